"""Vulkan compute through the system loader (ctypes): the layer the `vulkan` backend sits on.

Only what compute needs, in one file:
- Loader and instance: libvulkan.so.1 (libvulkan.so on Android/Termux; MINIFT_VK_LOADER names
  another file), API 1.1 or newer, portability enumeration where the loader has it. With
  MINIFT_VK_VALIDATION=1 the Khronos validation layer runs (synchronization validation on) and its
  messages go to the minift logger; asked for but not installed, one warning and no layer.
- Device choice: discrete GPU, then integrated, virtual, other, and CPU devices (lavapipe) last;
  MINIFT_VK_DEVICE picks one by index (as `vulkaninfo --summary` numbers them) or name substring.
  Caps holds what the device says about itself (limits, subgroup size, fp16, 16/8-bit storage,
  memory heaps and types).
- Memory: a tensor's Memory is sub-allocated from a few large VkDeviceMemory blocks (drivers limit
  and slow down allocations), each with one VkBuffer over all of it. On unified memory (every phone,
  lavapipe) the blocks are device-local *and* host-visible, mapped once, and uploads/downloads are
  NumPy copies; elsewhere they go through a host-visible staging buffer.
- Tensors larger than one binding (the piece scheme the renderer uses): a Memory of n bytes is
  stored as pieces of `Device.window` bytes each, the last one shorter. window is the largest power
  of two within maxStorageBufferRange and maxMemoryAllocationSize (128 MiB on lavapipe and many
  phones), so a piece holds whole elements of any dtype and element i of a tensor lives in piece
  i >> log2(window / itemsize) at index i & (window / itemsize - 1). Each piece is one storage
  buffer binding: a shader reading a tensor of k pieces declares k consecutive bindings (Memory
  objects bind in order, piece by piece) and picks the piece by that index; most tensors have one
  piece and need nothing special. `Device.bindings_for(nbytes)` says k before a Memory exists. Pieces of
  one tensor may lie in different VkDeviceMemory blocks, so a tensor is never limited by
  maxStorageBufferRange nor by maxMemoryAllocationSize.
- Kernels: GLSL 450 compute source compiled to SPIR-V by glslc (preferred: one process compiles a
  schedule's new shaders together) or glslangValidator found on PATH,
  cached in ~/.cache/minift/vk ($MINIFT_CACHE_DIR/vk) keyed by the source, the compiler's version
  and the device, kept under MINIFT_CACHE_MAX_MB like the other kernel caches; compute pipelines are
  created through a VkPipelineCache saved in the same folder when the device closes.
- Dispatch: dispatches, copies and fills are recorded into one command buffer, with a pipeline
  barrier only before a command that touches memory an earlier command since the last barrier wrote
  (or writes memory one read); `flush()` submits it once and waits on one fence. Host access to a
  Memory the pending commands use flushes first. A Memory freed while pending commands use it
  waits in limbo; when an allocation finds no room otherwise, the limbo's space is handed out again
  behind a pipeline barrier (the commands that used it are recorded before, those that use the new
  Memory after), so a long recording reuses its intermediates' memory instead of growing or
  submitting early; a Memory made from such space counts as in use until the flush (a host copy
  into it waits for the commands that read the old contents). With DEBUG>=2 (or profiling=True)
  every dispatch is timed with timestamp queries (`Device.timings` after a flush).

Errors: VulkanUnavailable (no loader, no usable device, no compiler: the backend falls back to
NumPy), VulkanError (a call returned an error: names the call and the VkResult), ShaderCompileError
(names the kernel, carries the compiler's message).
"""
import atexit, bisect, concurrent.futures, ctypes, hashlib, logging, os, re, shutil, subprocess, sys, tempfile, threading
from ctypes import addressof, byref, c_char, c_char_p, c_float, c_int32, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass, asdict
from pathlib import Path
import numpy as np
from minift.helpers import DEBUG, prune_cache, touch_cache, write_cache_file

log = logging.getLogger("minift")


# ---- errors

RESULT_NAMES = {
  0: "VK_SUCCESS", 1: "VK_NOT_READY", 2: "VK_TIMEOUT", 3: "VK_EVENT_SET", 4: "VK_EVENT_RESET", 5: "VK_INCOMPLETE",
  -1: "VK_ERROR_OUT_OF_HOST_MEMORY", -2: "VK_ERROR_OUT_OF_DEVICE_MEMORY", -3: "VK_ERROR_INITIALIZATION_FAILED",
  -4: "VK_ERROR_DEVICE_LOST", -5: "VK_ERROR_MEMORY_MAP_FAILED", -6: "VK_ERROR_LAYER_NOT_PRESENT",
  -7: "VK_ERROR_EXTENSION_NOT_PRESENT", -8: "VK_ERROR_FEATURE_NOT_PRESENT", -9: "VK_ERROR_INCOMPATIBLE_DRIVER",
  -10: "VK_ERROR_TOO_MANY_OBJECTS", -11: "VK_ERROR_FORMAT_NOT_SUPPORTED", -12: "VK_ERROR_FRAGMENTED_POOL",
  -13: "VK_ERROR_UNKNOWN", -1000069000: "VK_ERROR_OUT_OF_POOL_MEMORY", -1000072003: "VK_ERROR_INVALID_EXTERNAL_HANDLE",
  -1000161000: "VK_ERROR_FRAGMENTATION", -1000257000: "VK_ERROR_INVALID_OPAQUE_CAPTURE_ADDRESS",
  -1000012000: "VK_ERROR_INVALID_SHADER_NV", 1000297000: "VK_PIPELINE_COMPILE_REQUIRED",
}
OUT_OF_MEMORY = (-1, -2)


class VulkanUnavailable(RuntimeError):
  """No Vulkan loader, no usable device, or no GLSL compiler: the backend falls back to NumPy."""


class VulkanError(RuntimeError):
  """A Vulkan call returned an error VkResult."""

  def __init__(self, call, result):
    self.call, self.result = call, result
    self.result_name = RESULT_NAMES.get(result, f"VkResult {result}")
    super().__init__(f"{call} failed: {self.result_name}")


class ShaderCompileError(RuntimeError):
  """A GLSL kernel failed to compile; carries the kernel name, the compiler's message and the source."""

  def __init__(self, kernel_name, message, src):
    super().__init__(f"GLSL compile of kernel {kernel_name!r} failed:\n{message}")
    self.kernel_name, self.message, self.src = kernel_name, message, src


# ---- structures, written as the Vulkan headers declare them ("type name name; type name[count]")

_CTYPES = {"u8": c_uint8, "u32": c_uint32, "i32": c_int32, "u64": c_uint64, "f32": c_float, "size": c_size_t,
           "ptr": c_void_p, "str": c_char_p, "char": c_char,
           "h": c_uint64}   # a non-dispatchable handle (VkBuffer, VkPipeline, ...) is 64 bits everywhere


class _Struct(ctypes.Structure):
  _stype = None

  def __init__(self, **fields):
    super().__init__(**fields)
    if self._stype is not None and "sType" not in fields: self.sType = self._stype


def _struct(name, spec, stype=None):
  fields = []
  for decl in spec.split(";"):
    kind, *names = decl.split()
    base = _CTYPES[kind] if kind in _CTYPES else globals()[kind]
    for n in names:
      m = re.fullmatch(r"(\w+)\[(\d+)\]", n)
      fields.append((m[1], base * int(m[2])) if m else (n, base))
  return type(name, (_Struct,), {"_fields_": fields, "_stype": stype})


VkApplicationInfo = _struct("VkApplicationInfo", "u32 sType; ptr pNext; str pApplicationName; u32 applicationVersion; "
                            "str pEngineName; u32 engineVersion apiVersion", 0)
VkInstanceCreateInfo = _struct("VkInstanceCreateInfo", "u32 sType; ptr pNext; u32 flags; ptr pApplicationInfo; u32 enabledLayerCount; "
                               "ptr ppEnabledLayerNames; u32 enabledExtensionCount; ptr ppEnabledExtensionNames", 1)
VkLayerProperties = _struct("VkLayerProperties", "char layerName[256]; u32 specVersion implementationVersion; char description[256]")
VkExtensionProperties = _struct("VkExtensionProperties", "char extensionName[256]; u32 specVersion")
VkValidationFeaturesEXT = _struct("VkValidationFeaturesEXT", "u32 sType; ptr pNext; u32 enabledValidationFeatureCount; "
                                  "ptr pEnabledValidationFeatures; u32 disabledValidationFeatureCount; ptr pDisabledValidationFeatures", 1000247000)
VkDebugUtilsMessengerCreateInfoEXT = _struct("VkDebugUtilsMessengerCreateInfoEXT", "u32 sType; ptr pNext; u32 flags messageSeverity messageType; "
                                             "ptr pfnUserCallback pUserData", 1000128004)
VkDebugUtilsMessengerCallbackDataEXT = _struct("VkDebugUtilsMessengerCallbackDataEXT", "u32 sType; ptr pNext; u32 flags; str pMessageIdName; "
                                               "i32 messageIdNumber; str pMessage; u32 queueLabelCount; ptr pQueueLabels; "
                                               "u32 cmdBufLabelCount; ptr pCmdBufLabels; u32 objectCount; ptr pObjects")
VkPhysicalDeviceLimits = _struct("VkPhysicalDeviceLimits", """
  u32 maxImageDimension1D maxImageDimension2D maxImageDimension3D maxImageDimensionCube maxImageArrayLayers
      maxTexelBufferElements maxUniformBufferRange maxStorageBufferRange maxPushConstantsSize maxMemoryAllocationCount
      maxSamplerAllocationCount;
  u64 bufferImageGranularity sparseAddressSpaceSize;
  u32 maxBoundDescriptorSets maxPerStageDescriptorSamplers maxPerStageDescriptorUniformBuffers maxPerStageDescriptorStorageBuffers
      maxPerStageDescriptorSampledImages maxPerStageDescriptorStorageImages maxPerStageDescriptorInputAttachments
      maxPerStageResources maxDescriptorSetSamplers maxDescriptorSetUniformBuffers maxDescriptorSetUniformBuffersDynamic
      maxDescriptorSetStorageBuffers maxDescriptorSetStorageBuffersDynamic maxDescriptorSetSampledImages
      maxDescriptorSetStorageImages maxDescriptorSetInputAttachments maxVertexInputAttributes maxVertexInputBindings
      maxVertexInputAttributeOffset maxVertexInputBindingStride maxVertexOutputComponents maxTessellationGenerationLevel
      maxTessellationPatchSize maxTessellationControlPerVertexInputComponents maxTessellationControlPerVertexOutputComponents
      maxTessellationControlPerPatchOutputComponents maxTessellationControlTotalOutputComponents
      maxTessellationEvaluationInputComponents maxTessellationEvaluationOutputComponents maxGeometryShaderInvocations
      maxGeometryInputComponents maxGeometryOutputComponents maxGeometryOutputVertices maxGeometryTotalOutputComponents
      maxFragmentInputComponents maxFragmentOutputAttachments maxFragmentDualSrcAttachments maxFragmentCombinedOutputResources
      maxComputeSharedMemorySize maxComputeWorkGroupCount[3] maxComputeWorkGroupInvocations maxComputeWorkGroupSize[3]
      subPixelPrecisionBits subTexelPrecisionBits mipmapPrecisionBits maxDrawIndexedIndexValue maxDrawIndirectCount;
  f32 maxSamplerLodBias maxSamplerAnisotropy;
  u32 maxViewports maxViewportDimensions[2];
  f32 viewportBoundsRange[2];
  u32 viewportSubPixelBits;
  size minMemoryMapAlignment;
  u64 minTexelBufferOffsetAlignment minUniformBufferOffsetAlignment minStorageBufferOffsetAlignment;
  i32 minTexelOffset; u32 maxTexelOffset; i32 minTexelGatherOffset; u32 maxTexelGatherOffset;
  f32 minInterpolationOffset maxInterpolationOffset;
  u32 subPixelInterpolationOffsetBits maxFramebufferWidth maxFramebufferHeight maxFramebufferLayers framebufferColorSampleCounts
      framebufferDepthSampleCounts framebufferStencilSampleCounts framebufferNoAttachmentsSampleCounts maxColorAttachments
      sampledImageColorSampleCounts sampledImageIntegerSampleCounts sampledImageDepthSampleCounts
      sampledImageStencilSampleCounts storageImageSampleCounts maxSampleMaskWords timestampComputeAndGraphics;
  f32 timestampPeriod;
  u32 maxClipDistances maxCullDistances maxCombinedClipAndCullDistances discreteQueuePriorities;
  f32 pointSizeRange[2] lineWidthRange[2] pointSizeGranularity lineWidthGranularity;
  u32 strictLines standardSampleLocations;
  u64 optimalBufferCopyOffsetAlignment optimalBufferCopyRowPitchAlignment nonCoherentAtomSize""")
VkPhysicalDeviceSparseProperties = _struct("VkPhysicalDeviceSparseProperties", "u32 residencyStandard2DBlockShape "
                                           "residencyStandard2DMultisampleBlockShape residencyStandard3DBlockShape "
                                           "residencyAlignedMipSize residencyNonResidentStrict")
VkPhysicalDeviceProperties = _struct("VkPhysicalDeviceProperties", "u32 apiVersion driverVersion vendorID deviceID deviceType; "
                                     "char deviceName[256]; u8 pipelineCacheUUID[16]; VkPhysicalDeviceLimits limits; "
                                     "VkPhysicalDeviceSparseProperties sparseProperties")
VkPhysicalDeviceProperties2 = _struct("VkPhysicalDeviceProperties2", "u32 sType; ptr pNext; VkPhysicalDeviceProperties properties", 1000059001)
VkPhysicalDeviceSubgroupProperties = _struct("VkPhysicalDeviceSubgroupProperties", "u32 sType; ptr pNext; u32 subgroupSize "
                                             "supportedStages supportedOperations quadOperationsInAllStages", 1000094000)
VkPhysicalDeviceMaintenance3Properties = _struct("VkPhysicalDeviceMaintenance3Properties", "u32 sType; ptr pNext; "
                                                 "u32 maxPerSetDescriptors; u64 maxMemoryAllocationSize", 1000168000)
VkPhysicalDeviceDriverProperties = _struct("VkPhysicalDeviceDriverProperties", "u32 sType; ptr pNext; u32 driverID; "
                                           "char driverName[256] driverInfo[256]; u8 conformanceVersion[4]", 1000196000)
VkPhysicalDeviceFeatures = _struct("VkPhysicalDeviceFeatures", "u32 " + """
  robustBufferAccess fullDrawIndexUint32 imageCubeArray independentBlend geometryShader tessellationShader sampleRateShading
  dualSrcBlend logicOp multiDrawIndirect drawIndirectFirstInstance depthClamp depthBiasClamp fillModeNonSolid depthBounds
  wideLines largePoints alphaToOne multiViewport samplerAnisotropy textureCompressionETC2 textureCompressionASTC_LDR
  textureCompressionBC occlusionQueryPrecise pipelineStatisticsQuery vertexPipelineStoresAndAtomics fragmentStoresAndAtomics
  shaderTessellationAndGeometryPointSize shaderImageGatherExtended shaderStorageImageExtendedFormats
  shaderStorageImageMultisample shaderStorageImageReadWithoutFormat shaderStorageImageWriteWithoutFormat
  shaderUniformBufferArrayDynamicIndexing shaderSampledImageArrayDynamicIndexing shaderStorageBufferArrayDynamicIndexing
  shaderStorageImageArrayDynamicIndexing shaderClipDistance shaderCullDistance shaderFloat64 shaderInt64 shaderInt16
  shaderResourceResidency shaderResourceMinLod sparseBinding sparseResidencyBuffer sparseResidencyImage2D
  sparseResidencyImage3D sparseResidency2Samples sparseResidency4Samples sparseResidency8Samples sparseResidency16Samples
  sparseResidencyAliased variableMultisampleRate inheritedQueries""")
VkPhysicalDeviceFeatures2 = _struct("VkPhysicalDeviceFeatures2", "u32 sType; ptr pNext; VkPhysicalDeviceFeatures features", 1000059000)
VkPhysicalDevice16BitStorageFeatures = _struct("VkPhysicalDevice16BitStorageFeatures", "u32 sType; ptr pNext; u32 storageBuffer16BitAccess "
                                               "uniformAndStorageBuffer16BitAccess storagePushConstant16 storageInputOutput16", 1000083000)
VkPhysicalDeviceShaderFloat16Int8Features = _struct("VkPhysicalDeviceShaderFloat16Int8Features", "u32 sType; ptr pNext; "
                                                    "u32 shaderFloat16 shaderInt8", 1000082000)
VkPhysicalDeviceFloatControlsProperties = _struct("VkPhysicalDeviceFloatControlsProperties", "u32 sType; ptr pNext; u32 denormBehaviorIndependence "
                                                  "roundingModeIndependence shaderSignedZeroInfNanPreserveFloat16 shaderSignedZeroInfNanPreserveFloat32 "
                                                  "shaderSignedZeroInfNanPreserveFloat64 rest[12]", 1000197000)
VkPhysicalDevice8BitStorageFeatures = _struct("VkPhysicalDevice8BitStorageFeatures", "u32 sType; ptr pNext; u32 storageBuffer8BitAccess "
                                              "uniformAndStorageBuffer8BitAccess storagePushConstant8", 1000177000)
VkQueueFamilyProperties = _struct("VkQueueFamilyProperties", "u32 queueFlags queueCount timestampValidBits minImageTransferGranularity[3]")
VkMemoryType = _struct("VkMemoryType", "u32 propertyFlags heapIndex")
VkMemoryHeap = _struct("VkMemoryHeap", "u64 size; u32 flags")
VkPhysicalDeviceMemoryProperties = _struct("VkPhysicalDeviceMemoryProperties", "u32 memoryTypeCount; VkMemoryType memoryTypes[32]; "
                                           "u32 memoryHeapCount; VkMemoryHeap memoryHeaps[16]")
VkDeviceQueueCreateInfo = _struct("VkDeviceQueueCreateInfo", "u32 sType; ptr pNext; u32 flags queueFamilyIndex queueCount; ptr pQueuePriorities", 2)
VkDeviceCreateInfo = _struct("VkDeviceCreateInfo", "u32 sType; ptr pNext; u32 flags queueCreateInfoCount; ptr pQueueCreateInfos; "
                             "u32 enabledLayerCount; ptr ppEnabledLayerNames; u32 enabledExtensionCount; ptr ppEnabledExtensionNames; "
                             "ptr pEnabledFeatures", 3)
VkBufferCreateInfo = _struct("VkBufferCreateInfo", "u32 sType; ptr pNext; u32 flags; u64 size; u32 usage sharingMode "
                             "queueFamilyIndexCount; ptr pQueueFamilyIndices", 12)
VkMemoryRequirements = _struct("VkMemoryRequirements", "u64 size alignment; u32 memoryTypeBits")
VkMemoryAllocateInfo = _struct("VkMemoryAllocateInfo", "u32 sType; ptr pNext; u64 allocationSize; u32 memoryTypeIndex", 5)
VkShaderModuleCreateInfo = _struct("VkShaderModuleCreateInfo", "u32 sType; ptr pNext; u32 flags; size codeSize; ptr pCode", 16)
VkPipelineCacheCreateInfo = _struct("VkPipelineCacheCreateInfo", "u32 sType; ptr pNext; u32 flags; size initialDataSize; ptr pInitialData", 17)
VkDescriptorSetLayoutBinding = _struct("VkDescriptorSetLayoutBinding", "u32 binding descriptorType descriptorCount stageFlags; "
                                       "ptr pImmutableSamplers")
VkDescriptorSetLayoutCreateInfo = _struct("VkDescriptorSetLayoutCreateInfo", "u32 sType; ptr pNext; u32 flags bindingCount; ptr pBindings", 32)
VkPushConstantRange = _struct("VkPushConstantRange", "u32 stageFlags offset size")
VkPipelineLayoutCreateInfo = _struct("VkPipelineLayoutCreateInfo", "u32 sType; ptr pNext; u32 flags setLayoutCount; ptr pSetLayouts; "
                                     "u32 pushConstantRangeCount; ptr pPushConstantRanges", 30)
VkPipelineShaderStageCreateInfo = _struct("VkPipelineShaderStageCreateInfo", "u32 sType; ptr pNext; u32 flags stage; h module; "
                                          "str pName; ptr pSpecializationInfo", 18)
VkComputePipelineCreateInfo = _struct("VkComputePipelineCreateInfo", "u32 sType; ptr pNext; u32 flags; "
                                      "VkPipelineShaderStageCreateInfo stage; h layout basePipelineHandle; i32 basePipelineIndex", 29)
VkPipelineCreationFeedback = _struct("VkPipelineCreationFeedback", "u32 flags; u64 duration")
VkPipelineCreationFeedbackCreateInfo = _struct("VkPipelineCreationFeedbackCreateInfo", "u32 sType; ptr pNext; ptr pPipelineCreationFeedback; "
                                               "u32 pipelineStageCreationFeedbackCount; ptr pPipelineStageCreationFeedbacks", 1000192000)
VkDescriptorPoolSize = _struct("VkDescriptorPoolSize", "u32 type descriptorCount")
VkDescriptorPoolCreateInfo = _struct("VkDescriptorPoolCreateInfo", "u32 sType; ptr pNext; u32 flags maxSets poolSizeCount; ptr pPoolSizes", 33)
VkDescriptorSetAllocateInfo = _struct("VkDescriptorSetAllocateInfo", "u32 sType; ptr pNext; h descriptorPool; u32 descriptorSetCount; "
                                      "ptr pSetLayouts", 34)
VkDescriptorBufferInfo = _struct("VkDescriptorBufferInfo", "h buffer; u64 offset range")
VkWriteDescriptorSet = _struct("VkWriteDescriptorSet", "u32 sType; ptr pNext; h dstSet; u32 dstBinding dstArrayElement descriptorCount "
                               "descriptorType; ptr pImageInfo pBufferInfo pTexelBufferView", 35)
VkCommandPoolCreateInfo = _struct("VkCommandPoolCreateInfo", "u32 sType; ptr pNext; u32 flags queueFamilyIndex", 39)
VkCommandBufferAllocateInfo = _struct("VkCommandBufferAllocateInfo", "u32 sType; ptr pNext; h commandPool; u32 level commandBufferCount", 40)
VkCommandBufferBeginInfo = _struct("VkCommandBufferBeginInfo", "u32 sType; ptr pNext; u32 flags; ptr pInheritanceInfo", 42)
VkMemoryBarrier = _struct("VkMemoryBarrier", "u32 sType; ptr pNext; u32 srcAccessMask dstAccessMask", 46)
VkBufferCopy = _struct("VkBufferCopy", "u64 srcOffset dstOffset size")
VkSubmitInfo = _struct("VkSubmitInfo", "u32 sType; ptr pNext; u32 waitSemaphoreCount; ptr pWaitSemaphores pWaitDstStageMask; "
                       "u32 commandBufferCount; ptr pCommandBuffers; u32 signalSemaphoreCount; ptr pSignalSemaphores", 4)
VkFenceCreateInfo = _struct("VkFenceCreateInfo", "u32 sType; ptr pNext; u32 flags", 8)
VkQueryPoolCreateInfo = _struct("VkQueryPoolCreateInfo", "u32 sType; ptr pNext; u32 flags queryType queryCount pipelineStatistics", 11)

# the flags and enums used below
API_1_1, API_1_2, API_1_3 = (1 << 22) | (1 << 12), (1 << 22) | (2 << 12), (1 << 22) | (3 << 12)
QUEUE_COMPUTE = 0x2
MEM_DEVICE_LOCAL, MEM_HOST_VISIBLE, MEM_HOST_COHERENT, MEM_HOST_CACHED = 0x1, 0x2, 0x4, 0x8
HEAP_DEVICE_LOCAL = 0x1
BUFFER_USAGE = 0x1 | 0x2 | 0x20                 # transfer src, transfer dst, storage buffer
DESCRIPTOR_STORAGE_BUFFER = 7
STAGE_COMPUTE_SHADER_BIT = 0x20                 # VkShaderStageFlagBits
PIPE_COMPUTE, PIPE_TRANSFER, PIPE_BOTTOM, PIPE_HOST = 0x800, 0x1000, 0x2000, 0x4000   # VkPipelineStageFlagBits
ACCESS_SHADER_READ, ACCESS_SHADER_WRITE, ACCESS_TRANSFER_READ, ACCESS_TRANSFER_WRITE, ACCESS_HOST_READ = 0x20, 0x40, 0x800, 0x1000, 0x2000
BIND_POINT_COMPUTE = 1
QUERY_TIMESTAMP, QUERY_RESULT_64_WAIT = 2, 0x1 | 0x2
FEEDBACK_VALID, FEEDBACK_CACHE_HIT = 0x1, 0x2
SEVERITY_INFO, SEVERITY_WARNING, SEVERITY_ERROR = 0x10, 0x100, 0x1000
PORTABILITY_ENUMERATION = "VK_KHR_portability_enumeration"
VALIDATION_LAYER = "VK_LAYER_KHRONOS_validation"
SUBGROUP_OPS = ("basic", "vote", "arithmetic", "ballot", "shuffle", "shuffle_relative", "clustered", "quad")
DEVICE_TYPES = {0: "other", 1: "integrated GPU", 2: "discrete GPU", 3: "virtual GPU", 4: "CPU"}
TYPE_ORDER = {2: 0, 1: 1, 3: 2, 0: 3, 4: 4}    # default choice: discrete, integrated, virtual, other, CPU
VENDORS = {0x1002: "AMD", 0x1010: "Imagination", 0x10DE: "NVIDIA", 0x13B5: "ARM", 0x5143: "Qualcomm", 0x8086: "Intel",
           0x106B: "Apple", 0x144D: "Samsung", 0x19E5: "Huawei", 0x10005: "Mesa"}


# ---- the loader

_R, _P, _D, _H, _U32, _U64, _S = c_int32, c_void_p, c_void_p, c_uint64, c_uint32, c_uint64, c_char_p
_PROTOS = {   # name: (result type, argument types...); _R functions return a VkResult, None ones nothing
  "vkEnumerateInstanceVersion": (_R, _P),
  "vkEnumerateInstanceLayerProperties": (_R, _P, _P),
  "vkEnumerateInstanceExtensionProperties": (_R, _S, _P, _P),
  "vkCreateInstance": (_R, _P, _P, _P),
  "vkDestroyInstance": (None, _D, _P),
  "vkGetInstanceProcAddr": (c_void_p, _D, _S),
  "vkEnumeratePhysicalDevices": (_R, _D, _P, _P),
  "vkGetPhysicalDeviceProperties": (None, _D, _P),
  "vkGetPhysicalDeviceProperties2": (None, _D, _P),
  "vkGetPhysicalDeviceFeatures2": (None, _D, _P),
  "vkGetPhysicalDeviceMemoryProperties": (None, _D, _P),
  "vkGetPhysicalDeviceQueueFamilyProperties": (None, _D, _P, _P),
  "vkEnumerateDeviceExtensionProperties": (_R, _D, _S, _P, _P),
  "vkCreateDevice": (_R, _D, _P, _P, _P),
  "vkDestroyDevice": (None, _D, _P),
  "vkGetDeviceQueue": (None, _D, _U32, _U32, _P),
  "vkDeviceWaitIdle": (_R, _D),
  "vkCreateBuffer": (_R, _D, _P, _P, _P),
  "vkDestroyBuffer": (None, _D, _H, _P),
  "vkGetBufferMemoryRequirements": (None, _D, _H, _P),
  "vkAllocateMemory": (_R, _D, _P, _P, _P),
  "vkFreeMemory": (None, _D, _H, _P),
  "vkBindBufferMemory": (_R, _D, _H, _H, _U64),
  "vkMapMemory": (_R, _D, _H, _U64, _U64, _U32, _P),
  "vkUnmapMemory": (None, _D, _H),
  "vkCreateShaderModule": (_R, _D, _P, _P, _P),
  "vkDestroyShaderModule": (None, _D, _H, _P),
  "vkCreatePipelineCache": (_R, _D, _P, _P, _P),
  "vkDestroyPipelineCache": (None, _D, _H, _P),
  "vkGetPipelineCacheData": (_R, _D, _H, _P, _P),
  "vkCreateDescriptorSetLayout": (_R, _D, _P, _P, _P),
  "vkDestroyDescriptorSetLayout": (None, _D, _H, _P),
  "vkCreatePipelineLayout": (_R, _D, _P, _P, _P),
  "vkDestroyPipelineLayout": (None, _D, _H, _P),
  "vkCreateComputePipelines": (_R, _D, _H, _U32, _P, _P, _P),
  "vkDestroyPipeline": (None, _D, _H, _P),
  "vkCreateDescriptorPool": (_R, _D, _P, _P, _P),
  "vkDestroyDescriptorPool": (None, _D, _H, _P),
  "vkResetDescriptorPool": (_R, _D, _H, _U32),
  "vkAllocateDescriptorSets": (_R, _D, _P, _P),
  "vkUpdateDescriptorSets": (None, _D, _U32, _P, _U32, _P),
  "vkCreateCommandPool": (_R, _D, _P, _P, _P),
  "vkDestroyCommandPool": (None, _D, _H, _P),
  "vkAllocateCommandBuffers": (_R, _D, _P, _P),
  "vkResetCommandBuffer": (_R, _D, _U32),
  "vkBeginCommandBuffer": (_R, _D, _P),
  "vkEndCommandBuffer": (_R, _D),
  "vkCmdBindPipeline": (None, _D, _U32, _H),
  "vkCmdBindDescriptorSets": (None, _D, _U32, _H, _U32, _U32, _P, _U32, _P),
  "vkCmdPushConstants": (None, _D, _H, _U32, _U32, _U32, _P),
  "vkCmdDispatch": (None, _D, _U32, _U32, _U32),
  "vkCmdPipelineBarrier": (None, _D, _U32, _U32, _U32, _U32, _P, _U32, _P, _U32, _P),
  "vkCmdCopyBuffer": (None, _D, _H, _H, _U32, _P),
  "vkCmdFillBuffer": (None, _D, _H, _U64, _U64, _U32),
  "vkCmdWriteTimestamp": (None, _D, _U32, _H, _U32),
  "vkCmdResetQueryPool": (None, _D, _H, _U32, _U32),
  "vkCreateFence": (_R, _D, _P, _P, _P),
  "vkDestroyFence": (None, _D, _H, _P),
  "vkResetFences": (_R, _D, _U32, _P),
  "vkWaitForFences": (_R, _D, _U32, _P, _U32, _U64),
  "vkQueueSubmit": (_R, _D, _U32, _P, _H),
  "vkCreateQueryPool": (_R, _D, _P, _P, _P),
  "vkDestroyQueryPool": (None, _D, _H, _P),
  "vkGetQueryPoolResults": (_R, _D, _H, _U32, _U32, c_size_t, _P, _U64, _U32),
}
_DEBUG_CALLBACK = ctypes.CFUNCTYPE(c_uint32, c_uint32, c_uint32, c_void_p, c_void_p)
_CREATE_MESSENGER = ctypes.CFUNCTYPE(c_int32, c_void_p, c_void_p, c_void_p, c_void_p)
_DESTROY_MESSENGER = ctypes.CFUNCTYPE(None, c_void_p, c_uint64, c_void_p)


def _library_names():
  if os.environ.get("MINIFT_VK_LOADER"): return [os.environ["MINIFT_VK_LOADER"]]
  if sys.platform == "darwin": return ["libvulkan.1.dylib", "libMoltenVK.dylib"]
  if sys.platform == "win32": return ["vulkan-1.dll"]
  return ["libvulkan.so.1", "libvulkan.so"]   # Android (Termux) has only the unversioned name


def _checked(name, fn):
  def call(*args):
    result = fn(*args)
    if result < 0: raise VulkanError(name, result)
    return result
  call.__name__ = name
  return call


def _missing(name):
  def call(*args): raise VulkanUnavailable(f"the Vulkan loader has no {name} (it predates Vulkan 1.1; minift needs 1.1 or newer)")
  return call


class _Loader:
  """The loader's exported functions, typed; those returning a VkResult raise VulkanError on an error."""

  def __init__(self):
    tried = []
    for name in _library_names():
      try:
        self.dll, self.name = ctypes.CDLL(name), name
        break
      except OSError as e:
        tried.append(f"{name}: {e}")
    else:
      raise VulkanUnavailable("no Vulkan loader (" + "; ".join(tried) + ")")
    for fn_name, (res, *args) in _PROTOS.items():
      fn = getattr(self.dll, fn_name, None)
      if fn is None:
        setattr(self, fn_name, _missing(fn_name))
        continue
      fn.restype, fn.argtypes = res, args
      setattr(self, fn_name, _checked(fn_name, fn) if res is _R else fn)


_vk = None


def loader():
  """The system Vulkan loader (loaded once); VulkanUnavailable when there is none."""
  global _vk
  if _vk is None: _vk = _Loader()
  return _vk


def _enumerate(fn, struct, *args):
  """The array a two-call Vulkan query returns (count first, then the items)."""
  count = c_uint32(0)
  while True:
    fn(*args, byref(count), None)
    items = (struct * count.value)()
    if fn(*args, byref(count), items) != 5: return list(items[:count.value])   # 5: VK_INCOMPLETE, it grew: ask again


def _handles(fn, *args):
  count = c_uint32(0)
  fn(*args, byref(count), None)
  items = (c_void_p * count.value)()
  fn(*args, byref(count), items)
  return list(items[:count.value])


def _text(raw): return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def version_str(v): return f"{(v >> 22) & 0x7f}.{(v >> 12) & 0x3ff}.{v & 0xfff}"


def driver_version_str(vendor_id, v):
  """driverVersion is vendor-encoded: NVIDIA packs four fields, everyone else (Mesa, Adreno, Mali) the API encoding."""
  if vendor_id == 0x10DE: return f"{v >> 22}.{(v >> 14) & 0xff}.{(v >> 6) & 0xff}.{v & 0x3f}"
  return version_str(v)


def _round_up(n, align): return (n + align - 1) // align * align


def _pow2_floor(n): return 1 << (int(n).bit_length() - 1)


# ---- instance

def instance_layers():
  return {_text(p.layerName) for p in _enumerate(loader().vkEnumerateInstanceLayerProperties, VkLayerProperties)}


def instance_extensions(layer=None):
  vk = loader()
  return {_text(p.extensionName) for p in _enumerate(vk.vkEnumerateInstanceExtensionProperties, VkExtensionProperties, layer.encode() if layer else None)}


class Instance:
  """A VkInstance (API 1.1+). validation: run the Khronos validation layer (None: MINIFT_VK_VALIDATION);
  its warnings and errors go to the minift logger and to `messages` as (severity, text)."""

  def __init__(self, validation=None, layers=()):
    vk = self.vk = loader()
    version = c_uint32(0)
    vk.vkEnumerateInstanceVersion(byref(version))
    if version.value < API_1_1: raise VulkanUnavailable(f"the Vulkan loader is version {version_str(version.value)}; minift needs 1.1 or newer")
    self.api_version = min(version.value, API_1_3)
    if validation is None: validation = os.environ.get("MINIFT_VK_VALIDATION", "0") not in ("", "0")
    layers, exts, flags, chain = list(layers), [], 0, None
    available = instance_extensions()
    if PORTABILITY_ENUMERATION in available:   # MoltenVK and other not-fully-conformant drivers list only with it
      exts.append(PORTABILITY_ENUMERATION)
      flags |= 0x1                             # VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR
    self.messages, self.validation = [], False
    self._callback = _DEBUG_CALLBACK(self._on_message)
    self._messenger_info = None
    if validation:
      if VALIDATION_LAYER not in instance_layers():
        log.warning(f"MINIFT_VK_VALIDATION=1 but the Vulkan validation layer ({VALIDATION_LAYER}) is not installed "
                    "(Debian/Ubuntu: apt install vulkan-validationlayers); running without it")
      else:
        self.validation = True
        layers.append(VALIDATION_LAYER)
        layer_exts = instance_extensions(VALIDATION_LAYER)
        exts.append("VK_EXT_debug_utils")
        severity = SEVERITY_WARNING | SEVERITY_ERROR | (SEVERITY_INFO if DEBUG >= 3 else 0)
        self._messenger_info = chain = VkDebugUtilsMessengerCreateInfoEXT(
          messageSeverity=severity, messageType=0x1 | 0x2 | 0x4, pfnUserCallback=ctypes.cast(self._callback, c_void_p))
        if "VK_EXT_validation_features" in layer_exts:   # synchronization validation: reports missing barriers
          exts.append("VK_EXT_validation_features")
          self._sync_feature = c_uint32(4)   # VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT
          self._features = VkValidationFeaturesEXT(pNext=addressof(chain), enabledValidationFeatureCount=1,
                                                   pEnabledValidationFeatures=addressof(self._sync_feature))
          chain = self._features
    app = VkApplicationInfo(pApplicationName=b"minift", pEngineName=b"minift", apiVersion=self.api_version)
    layer_names = (c_char_p * len(layers))(*[n.encode() for n in layers])
    ext_names = (c_char_p * len(exts))(*[n.encode() for n in exts])
    info = VkInstanceCreateInfo(pNext=addressof(chain) if chain is not None else None, flags=flags, pApplicationInfo=addressof(app),
                                enabledLayerCount=len(layers), ppEnabledLayerNames=addressof(layer_names),
                                enabledExtensionCount=len(exts), ppEnabledExtensionNames=addressof(ext_names))
    handle = c_void_p()
    try:
      vk.vkCreateInstance(byref(info), None, byref(handle))
    except VulkanError as e:
      if e.result != -9: raise   # VK_ERROR_INCOMPATIBLE_DRIVER: the loader found no driver (ICD) at all
      raise VulkanUnavailable(f"the Vulkan loader found no driver ({e.result_name}); on Debian/Ubuntu mesa-vulkan-drivers gives a CPU one") from None
    self.handle, self.extensions, self._messenger = handle.value, exts, None
    if self.validation:
      create = _CREATE_MESSENGER(vk.vkGetInstanceProcAddr(self.handle, b"vkCreateDebugUtilsMessengerEXT"))
      messenger = c_uint64(0)
      result = create(self.handle, byref(self._messenger_info), None, byref(messenger))
      if result < 0: raise VulkanError("vkCreateDebugUtilsMessengerEXT", result)
      self._messenger = messenger.value

  def _on_message(self, severity, types, data, user):
    try:
      d = ctypes.cast(data, ctypes.POINTER(VkDebugUtilsMessengerCallbackDataEXT)).contents
      text = _text(d.pMessage or b"")
      kind = "error" if severity & SEVERITY_ERROR else "warning" if severity & SEVERITY_WARNING else "info"
      self.messages.append((kind, text))
      (log.error if kind == "error" else log.warning if kind == "warning" else log.info)(f"Vulkan validation {kind}: {text}")
    except Exception:   # never raise through the driver
      pass
    return 0

  def physical_devices(self):
    """[(index, handle, VkPhysicalDeviceProperties)] in the order the loader lists them."""
    out = []
    for i, pd in enumerate(_handles(self.vk.vkEnumeratePhysicalDevices, self.handle)):
      props = VkPhysicalDeviceProperties()
      self.vk.vkGetPhysicalDeviceProperties(pd, byref(props))
      out.append((i, pd, props))
    return out

  def close(self):
    if self.handle is None: return
    if self._messenger:
      destroy = _DESTROY_MESSENGER(self.vk.vkGetInstanceProcAddr(self.handle, b"vkDestroyDebugUtilsMessengerEXT"))
      destroy(self.handle, self._messenger, None)
    self.vk.vkDestroyInstance(self.handle, None)
    self.handle = None


def select_physical_device(found, spec=""):
  """The (index, handle, props) MINIFT_VK_DEVICE names (an index or a name substring), else the
  first by type: discrete, integrated, virtual, other, CPU. Devices below Vulkan 1.1 are left out."""
  usable = [f for f in found if f[2].apiVersion >= API_1_1]
  names = "; ".join(f"{i}: {_text(p.deviceName)} ({DEVICE_TYPES.get(p.deviceType, '?')}, Vulkan {version_str(p.apiVersion)})"
                    for i, _, p in found) or "none"
  if spec.strip():
    s = spec.strip()
    hits = [f for f in found if f[0] == int(s)] if s.isdigit() else [f for f in found if s.lower() in _text(f[2].deviceName).lower()]
    if not hits: raise VulkanUnavailable(f"MINIFT_VK_DEVICE={spec!r} names no Vulkan device (have: {names})")
    if hits[0][2].apiVersion < API_1_1: raise VulkanUnavailable(f"MINIFT_VK_DEVICE={spec!r}: {_text(hits[0][2].deviceName)} has only Vulkan {version_str(hits[0][2].apiVersion)}; minift needs 1.1")
    return hits[0]
  if not usable: raise VulkanUnavailable(f"no Vulkan 1.1 device found (have: {names})")
  return min(usable, key=lambda f: (TYPE_ORDER.get(f[2].deviceType, 3), f[0]))


# ---- capabilities

@dataclass
class Caps:
  """What the device says about itself (query, do not assume)."""
  name: str
  vendor: str
  vendor_id: int
  device_id: int
  type: str
  api_version: str
  driver_version: str
  driver_name: str
  driver_info: str
  max_workgroup_invocations: int
  max_workgroup_size: tuple
  max_workgroup_count: tuple
  max_shared_memory: int          # bytes of shared memory a workgroup may use
  subgroup_size: int
  subgroup_ops: tuple             # names from SUBGROUP_OPS the compute stage supports
  max_storage_buffer_range: int   # bytes one storage buffer binding may span
  max_storage_buffers: int        # storage buffer bindings one compute shader may use
  max_push_constants_size: int
  min_storage_buffer_offset_alignment: int
  non_coherent_atom_size: int
  max_memory_allocation_size: int
  timestamp_period: float         # nanoseconds per timestamp tick
  timestamp_bits: int             # valid bits of the compute queue's timestamps (0: no timestamps)
  float16: bool                   # shaderFloat16: half arithmetic in shaders
  int8: bool
  int16: bool
  int64: bool
  float64: bool
  nan_preserve: bool              # shaderSignedZeroInfNanPreserveFloat32: shaders may ask that x*0 is not folded to 0 (NaN, inf, -0 kept)
  storage16: bool                 # storageBuffer16BitAccess: float16/int16 storage buffers
  storage8: bool                  # storageBuffer8BitAccess: uint8/int8 (bool) storage buffers
  memory_heaps: tuple             # ((bytes, device-local), ...)
  memory_types: tuple             # ((property flag names, heap index), ...)
  unified_memory: bool            # the main device-local heap has host-visible coherent memory
  pipeline_cache_uuid: str

  @property
  def is_cpu(self): return self.type == "CPU"

  def as_dict(self):
    d = asdict(self)
    d["is_cpu"] = self.is_cpu
    return d


def _memory_flag_names(flags):
  names = [("device_local", MEM_DEVICE_LOCAL), ("host_visible", MEM_HOST_VISIBLE), ("host_coherent", MEM_HOST_COHERENT),
           ("host_cached", MEM_HOST_CACHED), ("lazily_allocated", 0x10), ("protected", 0x20)]
  return tuple(n for n, bit in names if flags & bit)


def _main_heap(mem):
  """The largest device-local heap (the largest heap where none says device-local)."""
  heaps = [(mem.memoryHeaps[i].size, i) for i in range(mem.memoryHeapCount) if mem.memoryHeaps[i].flags & HEAP_DEVICE_LOCAL]
  heaps = heaps or [(mem.memoryHeaps[i].size, i) for i in range(mem.memoryHeapCount)]
  return max(heaps)[1]


def _pick_type(mem, want, heap=None, prefer=0, allowed=0xFFFFFFFF):
  """Index of a memory type having all `want` flags (in `heap` if given), those with `prefer` first; None if none."""
  hits = [i for i in range(mem.memoryTypeCount) if allowed >> i & 1 and mem.memoryTypes[i].propertyFlags & want == want
          and (heap is None or mem.memoryTypes[i].heapIndex == heap)]
  hits.sort(key=lambda i: mem.memoryTypes[i].propertyFlags & prefer != prefer)
  return hits[0] if hits else None


# ---- memory

class _Block:
  """One VkDeviceMemory with one VkBuffer over all of it; its space is handed out best-fit as
  (offset, size) holes, kept sorted by offset and merged with their neighbours on release."""
  __slots__ = ("memory", "buffer", "size", "host", "holes")

  def __init__(self, memory, buffer, size, host):
    self.memory, self.buffer, self.size, self.host = memory, buffer, size, host
    self.holes = [(0, size)]

  @property
  def empty(self): return self.holes == [(0, self.size)]

  def take(self, at, size):
    i = bisect.bisect_left(self.holes, (at, 0))
    off, hole = self.holes[i]
    if hole == size: del self.holes[i]
    else: self.holes[i] = (off + size, hole - size)

  def give(self, off, size):
    i = bisect.bisect_left(self.holes, (off, 0))
    if i < len(self.holes) and off + size == self.holes[i][0]:   # merge with the hole after
      size += self.holes.pop(i)[1]
    if i > 0 and self.holes[i - 1][0] + self.holes[i - 1][1] == off:   # and the one before
      off, size = self.holes[i - 1][0], self.holes[i - 1][1] + size
      self.holes[i - 1] = (off, size)
    else:
      self.holes.insert(i, (off, size))


class Memory:
  """Device memory of `nbytes` bytes: pieces of at most Device.window bytes (one for most
  tensors), each (block, offset, size) - a range of one block's VkBuffer, bound as one descriptor."""
  __slots__ = ("device", "nbytes", "pieces", "__weakref__")

  def __init__(self, device, nbytes, pieces):
    self.device, self.nbytes, self.pieces = device, nbytes, pieces

  def free(self): self.device.free(self)

  def __repr__(self): return f"<vulkan.Memory {self.nbytes} bytes in {len(self.pieces)} piece(s)>"


@dataclass
class Kernel:
  """A compute pipeline and its layout: nbindings storage buffers in set 0, push_size bytes of push constants."""
  name: str
  pipeline: int
  layout: int
  set_layout: int
  nbindings: int
  push_size: int


# ---- GLSL to SPIR-V

TARGET_ENV = "vulkan1.1"
SPIRV_MAGIC = 0x07230203


def default_cache_dir():
  env = os.environ.get("MINIFT_CACHE_DIR")   # the cache root, shared with the C loops and OpenCL (c/, cl/ beside vk/)
  return Path(env) / "vk" if env else Path.home() / ".cache" / "minift" / "vk"


def find_compiler():
  """Path of glslc, else glslangValidator, on PATH; None when neither is there. glslc first: it
  compiles many shaders in one process (compile_many), and a compiler process spends most of its
  time starting up."""
  return shutil.which("glslc") or shutil.which("glslangValidator")


class GLSLCompiler:
  """Compiles GLSL 450 compute shaders to SPIR-V with glslc or glslangValidator, caching the
  SPIR-V on disk keyed by the source, the compiler's version and the device."""

  def __init__(self, cache_dir=None, path=None):
    self.path = path or find_compiler()
    if not self.path:
      raise VulkanUnavailable("no GLSL compiler: glslangValidator or glslc must be on PATH "
                              "(Debian/Ubuntu: apt install glslang-tools or glslc; Termux: pkg install glslang or shaderc)")
    self.glslc = Path(self.path).name.startswith("glslc")
    r = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=60)
    self.version = (r.stdout + r.stderr).strip()
    self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    self.stats = {"compiled": 0, "cache_hits": 0, "processes": 0}
    self._warned, self._spirv, self._lock = False, {}, threading.Lock()   # _spirv: what this process compiled or loaded

  def _key(self, src, device_key):
    return hashlib.sha256("\0".join([src, self.version, TARGET_ENV, device_key]).encode()).hexdigest()

  def _cached(self, key):
    """SPIR-V from memory or the disk cache, else None."""
    spirv = self._spirv.get(key)
    if spirv is not None: return spirv
    path = self.cache_dir / f"{key[:40]}.spv"
    try:
      spirv = path.read_bytes()
      if len(spirv) >= 20 and len(spirv) % 4 == 0 and int.from_bytes(spirv[:4], "little") == SPIRV_MAGIC:
        with self._lock: self.stats["cache_hits"] += 1
        touch_cache(path)
        self._spirv[key] = spirv
        return spirv
    except OSError:
      pass
    return None

  def _keep(self, key, spirv):
    with self._lock: self.stats["compiled"] += 1
    self._save(self.cache_dir / f"{key[:40]}.spv", spirv)
    self._spirv[key] = spirv

  def compile(self, name, src, device_key=""):
    """SPIR-V bytes for `src`: from memory, else from the disk cache, else compiled
    (ShaderCompileError on failure) and cached."""
    key = self._key(src, device_key)
    spirv = self._cached(key)
    if spirv is None:
      spirv = self._run(name, src)
      self._keep(key, spirv)
    return spirv

  def compile_many(self, items, device_key=""):
    """Compile [(name, src)] at once (a schedule's new kernels): with glslc, a few processes that
    take many shaders each; with glslangValidator (one shader per process), one process per core
    at a time. A failing shader raises its own ShaderCompileError."""
    todo = {}
    for name, src in items:
      key = self._key(src, device_key)
      if key not in todo and self._cached(key) is None: todo[key] = (name, src)
    if not todo: return
    jobs = list(todo.items())
    workers = min(len(jobs), os.cpu_count() or 1)
    if self.glslc and len(jobs) > 1:
      batches = [jobs[i::workers] for i in range(workers)]
      with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool: list(pool.map(self._run_batch, batches))
      jobs = [(key, item) for key, item in jobs if key not in self._spirv]   # what a failed batch left: one by one, for its message
    if not jobs: return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      for f in [pool.submit(self.compile, name, src, device_key) for _, (name, src) in jobs]: f.result()

  def _run_batch(self, jobs):
    """glslc -c over many files in one process; keeps what it compiled (a failure leaves the rest to compile())."""
    with tempfile.TemporaryDirectory(prefix="minift-glsl-") as tmp:
      for n, (_, (_, src)) in enumerate(jobs): (Path(tmp) / f"k{n}.comp").write_text(src)
      with self._lock: self.stats["processes"] += 1
      subprocess.run([self.path, "-fshader-stage=compute", f"--target-env={TARGET_ENV}", "-c"] + [f"k{n}.comp" for n in range(len(jobs))],
                     capture_output=True, cwd=tmp, timeout=600)
      for n, (key, _) in enumerate(jobs):
        try: spirv = (Path(tmp) / f"k{n}.comp.spv").read_bytes()
        except OSError: continue
        if len(spirv) >= 20 and int.from_bytes(spirv[:4], "little") == SPIRV_MAGIC: self._keep(key, spirv)

  def _run(self, name, src):
    if DEBUG >= 3: log.info(f"Vulkan: compiling {name}")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "kernel"
    with tempfile.TemporaryDirectory(prefix="minift-glsl-") as tmp:
      inp, out = Path(tmp) / f"{stem}.comp", Path(tmp) / f"{stem}.spv"
      inp.write_text(src)
      if self.glslc: cmd = [self.path, "-fshader-stage=compute", f"--target-env={TARGET_ENV}", "-o", str(out), str(inp)]
      else: cmd = [self.path, "-V", "--target-env", TARGET_ENV, "-S", "comp", "-o", str(out), str(inp)]
      with self._lock: self.stats["processes"] += 1
      r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
      if r.returncode != 0 or not out.exists():
        lines = [l for l in (r.stdout + r.stderr).replace(tmp + os.sep, "").splitlines() if l.strip() and l.strip() != inp.name]
        raise ShaderCompileError(name, "\n".join(lines) or f"{Path(self.path).name} exited with {r.returncode}", src)
      return out.read_bytes()

  def _save(self, path, spirv):
    try:
      write_cache_file(path, spirv)
      prune_cache(path.parent, "*.spv")
    except OSError as e:
      if not self._warned:
        self._warned = True
        log.warning(f"Vulkan: cannot write the shader cache at {path.parent} ({e}); shaders will compile every run")


# ---- the device

BLOCK_SMALL, BLOCK_LARGE = 64 << 20, 256 << 20   # memory block size below / from a 4 GiB heap
POOL_SETS, POOL_DESCRIPTORS = 256, 2048          # per descriptor pool; more pools are made as needed
TIMED_DISPATCHES = 512                           # dispatches timed per submit (DEBUG>=2); more flush early
ALL_READ_WRITE = ACCESS_SHADER_READ | ACCESS_SHADER_WRITE | ACCESS_TRANSFER_READ | ACCESS_TRANSFER_WRITE


class Device:
  """One Vulkan device with one compute queue: memory, kernels, and a recorder of dispatches.

  spec: MINIFT_VK_DEVICE's form (None: read it). validation: the Khronos validation layer (None:
  MINIFT_VK_VALIDATION). profiling: timestamp every dispatch (None: DEBUG>=2). force_staging: go
  through staging copies even where device memory is host-visible (tests the discrete-GPU path).
  window: bytes per binding piece, a power of two at most what the device allows (tests use small
  ones). block_size: bytes per memory block."""

  def __init__(self, spec=None, validation=None, cache_dir=None, profiling=None, force_staging=False, window=None, block_size=None):
    self.instance = Instance(validation)
    self.vk, self.handle = self.instance.vk, None
    # what close() tears down, empty until made (destroying a null handle does nothing)
    self._kernels, self._layouts, self._set_layouts, self._pools, self._blocks, self._staging = {}, {}, {}, [], [], None
    self._query_pool = self._pipeline_cache = self._fence = self._command_pool = 0
    self._recording, self._pipeline_cache_dirty = False, False
    self.stats = {"allocations": 0, "submits": 0, "dispatches": 0, "barriers": 0, "pipelines": 0, "pipeline_cache_hits": 0}
    try:
      self._open(os.environ.get("MINIFT_VK_DEVICE", "") if spec is None else spec, cache_dir, profiling, force_staging, window, block_size)
    except BaseException:
      self.close()
      raise
    atexit.register(self.close)
    if DEBUG >= 1:
      log.info(f"Vulkan device: {self.caps.name} ({self.caps.type}, {self.caps.driver_name or self.caps.vendor} "
               f"{self.caps.driver_info or self.caps.driver_version}, {'unified' if self.unified else 'staged'} memory)")

  def __repr__(self): return f"<vulkan.Device {self.caps.name!r}>"

  # ---- set-up

  def _open(self, spec, cache_dir, profiling, force_staging, window, block_size):
    vk = self.vk
    self.index, self.physical, props = select_physical_device(self.instance.physical_devices(), spec)
    self.api_version = min(props.apiVersion, self.instance.api_version)
    self.device_extensions = {_text(p.extensionName) for p in _enumerate(vk.vkEnumerateDeviceExtensionProperties, VkExtensionProperties,
                                                                         self.physical, None)}
    has = lambda ext, core: self.api_version >= core or ext in self.device_extensions
    families = _enumerate(vk.vkGetPhysicalDeviceQueueFamilyProperties, VkQueueFamilyProperties, self.physical)
    compute = [i for i, f in enumerate(families) if f.queueFlags & QUEUE_COMPUTE]
    if not compute: raise VulkanUnavailable(f"{_text(props.deviceName)} has no compute queue")
    self.queue_family = compute[0]
    # features: ask, then enable the ones compute kernels may use
    s16, f16, s8 = VkPhysicalDevice16BitStorageFeatures(), VkPhysicalDeviceShaderFloat16Int8Features(), VkPhysicalDevice8BitStorageFeatures()
    extra = [s16] + ([f16] if has("VK_KHR_shader_float16_int8", API_1_2) else []) + ([s8] if has("VK_KHR_8bit_storage", API_1_2) else [])
    features = VkPhysicalDeviceFeatures2(pNext=_chain(extra))
    vk.vkGetPhysicalDeviceFeatures2(self.physical, byref(features))
    self.caps = self._query_caps(props, families[self.queue_family], features.features, s16, f16, s8, has)
    on = lambda ok: 1 if ok else 0
    want_core = VkPhysicalDeviceFeatures(shaderInt16=features.features.shaderInt16, shaderInt64=features.features.shaderInt64,
                                         shaderFloat64=features.features.shaderFloat64)
    want = [VkPhysicalDevice16BitStorageFeatures(storageBuffer16BitAccess=s16.storageBuffer16BitAccess)]
    if f16 in extra: want.append(VkPhysicalDeviceShaderFloat16Int8Features(shaderFloat16=on(f16.shaderFloat16), shaderInt8=on(f16.shaderInt8)))
    if s8 in extra: want.append(VkPhysicalDevice8BitStorageFeatures(storageBuffer8BitAccess=on(s8.storageBuffer8BitAccess)))
    enable = VkPhysicalDeviceFeatures2(pNext=_chain(want), features=want_core)
    exts = [e for e, core in (("VK_KHR_shader_float16_int8", API_1_2), ("VK_KHR_8bit_storage", API_1_2), ("VK_KHR_shader_float_controls", API_1_2),
                              ("VK_EXT_pipeline_creation_feedback", API_1_3)) if self.api_version < core and e in self.device_extensions]
    exts += [e for e in ("VK_KHR_portability_subset",) if e in self.device_extensions]   # required where offered
    self.feedback = has("VK_EXT_pipeline_creation_feedback", API_1_3)
    priority = c_float(1.0)
    queue_info = VkDeviceQueueCreateInfo(queueFamilyIndex=self.queue_family, queueCount=1, pQueuePriorities=addressof(priority))
    ext_names = (c_char_p * len(exts))(*[e.encode() for e in exts])
    info = VkDeviceCreateInfo(pNext=addressof(enable), queueCreateInfoCount=1, pQueueCreateInfos=addressof(queue_info),
                              enabledExtensionCount=len(exts), ppEnabledExtensionNames=addressof(ext_names))
    handle = c_void_p()
    vk.vkCreateDevice(self.physical, byref(info), None, byref(handle))
    self.handle = handle.value
    queue = c_void_p()
    vk.vkGetDeviceQueue(self.handle, self.queue_family, 0, byref(queue))
    self.queue = queue.value
    self._init_memory(force_staging, window, block_size)
    self._init_commands(profiling)
    self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    self.compiler = None   # found on the first kernel: a device without a compiler still moves memory
    self._pipeline_cache_path = self.cache_dir / f"pipelines-{self.caps.vendor_id:x}-{self.caps.device_id:x}-{self.caps.pipeline_cache_uuid}.pcache"
    self._init_pipeline_cache()

  def _query_caps(self, props, family, core, s16, f16, s8, has):
    sub, m3 = VkPhysicalDeviceSubgroupProperties(), VkPhysicalDeviceMaintenance3Properties()
    drv, fc = VkPhysicalDeviceDriverProperties(), VkPhysicalDeviceFloatControlsProperties()
    chain = [sub, m3] + ([drv] if has("VK_KHR_driver_properties", API_1_2) else []) + ([fc] if has("VK_KHR_shader_float_controls", API_1_2) else [])
    props2 = VkPhysicalDeviceProperties2(pNext=_chain(chain))
    self.vk.vkGetPhysicalDeviceProperties2(self.physical, byref(props2))
    mem = self._mem_props = VkPhysicalDeviceMemoryProperties()
    self.vk.vkGetPhysicalDeviceMemoryProperties(self.physical, byref(mem))
    lim, p = props2.properties.limits, props2.properties
    main = _main_heap(mem)
    unified = _pick_type(mem, MEM_DEVICE_LOCAL | MEM_HOST_VISIBLE | MEM_HOST_COHERENT, main) is not None
    return Caps(
      name=_text(p.deviceName), vendor=VENDORS.get(p.vendorID, f"0x{p.vendorID:x}"), vendor_id=p.vendorID, device_id=p.deviceID,
      type=DEVICE_TYPES.get(p.deviceType, "other"), api_version=version_str(p.apiVersion),
      driver_version=driver_version_str(p.vendorID, p.driverVersion),
      driver_name=_text(drv.driverName) if drv in chain else "", driver_info=_text(drv.driverInfo) if drv in chain else "",
      max_workgroup_invocations=lim.maxComputeWorkGroupInvocations, max_workgroup_size=tuple(lim.maxComputeWorkGroupSize),
      max_workgroup_count=tuple(lim.maxComputeWorkGroupCount), max_shared_memory=lim.maxComputeSharedMemorySize,
      subgroup_size=sub.subgroupSize,
      subgroup_ops=tuple(n for i, n in enumerate(SUBGROUP_OPS) if sub.supportedOperations >> i & 1) if sub.supportedStages & STAGE_COMPUTE_SHADER_BIT else (),
      max_storage_buffer_range=lim.maxStorageBufferRange, max_storage_buffers=lim.maxPerStageDescriptorStorageBuffers,
      max_push_constants_size=lim.maxPushConstantsSize, min_storage_buffer_offset_alignment=lim.minStorageBufferOffsetAlignment,
      non_coherent_atom_size=lim.nonCoherentAtomSize, max_memory_allocation_size=m3.maxMemoryAllocationSize,
      timestamp_period=lim.timestampPeriod, timestamp_bits=family.timestampValidBits,
      float16=bool(f16.shaderFloat16), int8=bool(f16.shaderInt8), int16=bool(core.shaderInt16), int64=bool(core.shaderInt64),
      float64=bool(core.shaderFloat64), nan_preserve=fc in chain and bool(fc.shaderSignedZeroInfNanPreserveFloat32),
      storage16=bool(s16.storageBuffer16BitAccess), storage8=bool(s8.storageBuffer8BitAccess),
      memory_heaps=tuple((mem.memoryHeaps[i].size, bool(mem.memoryHeaps[i].flags & HEAP_DEVICE_LOCAL)) for i in range(mem.memoryHeapCount)),
      memory_types=tuple((_memory_flag_names(mem.memoryTypes[i].propertyFlags), mem.memoryTypes[i].heapIndex) for i in range(mem.memoryTypeCount)),
      unified_memory=unified, pipeline_cache_uuid=bytes(p.pipelineCacheUUID).hex())

  def _init_memory(self, force_staging, window, block_size):
    mem, caps = self._mem_props, self.caps
    probe = self._create_buffer(4096)   # which memory types and what alignment a storage buffer gets
    req = VkMemoryRequirements()
    self.vk.vkGetBufferMemoryRequirements(self.handle, probe, byref(req))
    self.vk.vkDestroyBuffer(self.handle, probe, None)
    main = _main_heap(mem)
    unified = _pick_type(mem, MEM_DEVICE_LOCAL | MEM_HOST_VISIBLE | MEM_HOST_COHERENT, main, MEM_HOST_CACHED, req.memoryTypeBits)
    if unified is not None and caps.type == "discrete GPU" and not mem.memoryTypes[unified].propertyFlags & MEM_HOST_CACHED:
      unified = None   # video memory mapped over PCIe (resizable BAR): the CPU reads it slowly, stage instead
    self.unified = unified is not None and not force_staging
    if self.unified:
      self._device_type, self._staging_type = unified, None
    else:
      self._device_type = _pick_type(mem, MEM_DEVICE_LOCAL, main, 0, req.memoryTypeBits)
      if self._device_type is None: self._device_type = _pick_type(mem, 0, main, 0, req.memoryTypeBits)
      self._staging_type = _pick_type(mem, MEM_HOST_VISIBLE | MEM_HOST_COHERENT, None, MEM_HOST_CACHED, req.memoryTypeBits)
      if self._device_type is None or self._staging_type is None:
        raise VulkanUnavailable(f"{caps.name}: no usable memory type for storage buffers ({caps.memory_types})")
    self.heap_size = mem.memoryHeaps[mem.memoryTypes[self._device_type].heapIndex].size
    # every offset and size is a multiple of align: descriptor offsets and mapped ranges need it
    self.align = max(256, req.alignment, caps.min_storage_buffer_offset_alignment, caps.non_coherent_atom_size)
    limit = min(caps.max_storage_buffer_range, caps.max_memory_allocation_size or caps.max_storage_buffer_range, 1 << 31)
    natural = _pow2_floor(limit)
    if window is not None and (window & (window - 1) or window > natural or window < self.align):
      raise ValueError(f"window must be a power of two between {self.align} and {natural} bytes, not {window}")
    self.window = window or natural
    self.block_size = block_size or (BLOCK_LARGE if self.heap_size >= 4 << 30 else BLOCK_SMALL)
    self.keep_empty = self.heap_size // 4    # bytes of entirely free blocks kept for reuse

  def _init_commands(self, profiling):
    vk, dev = self.vk, self.handle
    pool = c_uint64(0)
    vk.vkCreateCommandPool(dev, byref(VkCommandPoolCreateInfo(flags=0x2, queueFamilyIndex=self.queue_family)), None, byref(pool))
    self._command_pool = pool.value
    cmd = c_void_p()
    vk.vkAllocateCommandBuffers(dev, byref(VkCommandBufferAllocateInfo(commandPool=self._command_pool, level=0, commandBufferCount=1)), byref(cmd))
    self._cmd = cmd.value
    fence = c_uint64(0)
    vk.vkCreateFence(dev, byref(VkFenceCreateInfo()), None, byref(fence))
    self._fence = fence.value
    self._pools, self._pool_at, self._pool_left = [], -1, (0, 0)
    self.profiling = (DEBUG >= 2 if profiling is None else profiling) and self.caps.timestamp_bits > 0
    self._timed, self._labels, self.timings = TIMED_DISPATCHES, [], []
    if self.profiling:
      qp = c_uint64(0)
      vk.vkCreateQueryPool(dev, byref(VkQueryPoolCreateInfo(queryType=QUERY_TIMESTAMP, queryCount=2 * self._timed)), None, byref(qp))
      self._query_pool = qp.value
    self._pipeline_bound, self._wrote = None, False
    self._written, self._read, self._in_use, self._deferred, self._recycled = set(), set(), {}, [], False

  def _init_pipeline_cache(self):
    try: data = self._pipeline_cache_path.read_bytes()
    except OSError: data = b""
    self.pipeline_cache_loaded = len(data)
    cache, initial = c_uint64(0), ctypes.create_string_buffer(data, len(data))
    try:
      info = VkPipelineCacheCreateInfo(initialDataSize=len(data), pInitialData=addressof(initial) if data else None)
      self.vk.vkCreatePipelineCache(self.handle, byref(info), None, byref(cache))
    except VulkanError:   # data the driver will not take: start empty
      self.pipeline_cache_loaded = 0
      self.vk.vkCreatePipelineCache(self.handle, byref(VkPipelineCacheCreateInfo()), None, byref(cache))
    self._pipeline_cache, self._pipeline_cache_dirty = cache.value, False

  # ---- memory

  def bindings_for(self, nbytes):
    """How many bindings (pieces of `window` bytes) a Memory of nbytes takes."""
    return max(1, -(-int(nbytes) // self.window))

  def alloc(self, nbytes):
    """A Memory of nbytes (contents undefined), sub-allocated from the blocks."""
    nbytes = int(nbytes)
    if nbytes < 0: raise ValueError(f"cannot allocate {nbytes} bytes")
    sizes = [min(self.window, nbytes - at) for at in range(0, nbytes, self.window)] or [0]
    pieces = []
    try:
      for s in sizes: pieces.append(self._take(_round_up(max(s, 1), self.align)))
    except BaseException:
      for block, off, size in pieces: block.give(off, size)
      raise
    mem = Memory(self, nbytes, pieces)
    if self._recycled: self._in_use[id(mem)] = mem   # it may lie where pending commands read: host copies wait for them
    return mem

  def free(self, mem):
    """Give a Memory's space back; if pending commands use it, after they have run or behind a
    barrier (_take)."""
    if not mem.pieces: return
    if id(mem) in self._in_use:
      self._deferred.append(mem.pieces)
    else:
      self._release(mem.pieces)
    mem.pieces = ()

  def _release(self, pieces):
    for block, off, size in pieces: block.give(off, size)
    if self._recording: return   # recorded commands may name any block: none is destroyed before the flush
    empty = [b for b in self._blocks if b.empty]
    while sum(b.size for b in empty) > self.keep_empty:   # keep some for reuse, give the rest back to the driver
      self._destroy_block(empty.pop())

  def trim(self):
    """Give every entirely free block back to the driver."""
    self.flush()
    for b in [b for b in self._blocks if b.empty]: self._destroy_block(b)

  @property
  def bytes_reserved(self): return sum(b.size for b in self._blocks)

  def _find(self, size):
    best = None
    for b in self._blocks:
      for off, hole in b.holes:
        if hole >= size and (best is None or hole < best[2]): best = (b, off, hole)
    return best

  def _take(self, size):
    best = self._find(size)
    if best is None and self._deferred:   # freed space waits for the pending commands: reuse it behind a barrier
      self._barrier(PIPE_COMPUTE | PIPE_TRANSFER, ACCESS_SHADER_WRITE | ACCESS_TRANSFER_WRITE, PIPE_COMPUTE | PIPE_TRANSFER, ALL_READ_WRITE)
      self.stats["barriers"] += 1
      self._written, self._read = set(), set()
      deferred, self._deferred, self._recycled = self._deferred, [], True
      for pieces in deferred: self._release(pieces)
      best = self._find(size)
    if best is None:
      block = self._new_block(max(self.block_size, size))
      best = (block, 0, block.size)
    block, off, _ = best
    block.take(off, size)
    return block, off, size

  def _create_buffer(self, size):
    buf = c_uint64(0)
    self.vk.vkCreateBuffer(self.handle, byref(VkBufferCreateInfo(size=size, usage=BUFFER_USAGE)), None, byref(buf))
    return buf.value

  def _new_block(self, size, staging=False):
    """A block for tensors (kept in _blocks), or the host-visible staging block."""
    memory_type, mapped = (self._staging_type, True) if staging else (self._device_type, self.unified)
    buf = self._create_buffer(size)
    req = VkMemoryRequirements()
    self.vk.vkGetBufferMemoryRequirements(self.handle, buf, byref(req))
    memory = c_uint64(0)
    info = VkMemoryAllocateInfo(allocationSize=req.size, memoryTypeIndex=memory_type)
    try:
      try:
        self.vk.vkAllocateMemory(self.handle, byref(info), None, byref(memory))
      except VulkanError as e:
        if e.result not in OUT_OF_MEMORY: raise
        self.trim()   # free blocks back to the driver, then once more
        try: self.vk.vkAllocateMemory(self.handle, byref(info), None, byref(memory))
        except VulkanError as e2:
          if e2.result not in OUT_OF_MEMORY: raise
          raise MemoryError(f"Vulkan: out of device memory allocating {size / 2**20:.1f} MiB on {self.caps.name} "
                            f"({self.bytes_reserved / 2**20:.0f} MiB held in {len(self._blocks)} blocks)") from None
    except BaseException:
      self.vk.vkDestroyBuffer(self.handle, buf, None)
      raise
    self.stats["allocations"] += 1
    self.vk.vkBindBufferMemory(self.handle, buf, memory.value, 0)
    host = None
    if mapped:
      ptr = c_void_p()
      self.vk.vkMapMemory(self.handle, memory.value, 0, size, 0, byref(ptr))   # mapped for the block's lifetime
      host = np.ctypeslib.as_array((c_uint8 * size).from_address(ptr.value))
    block = _Block(memory.value, buf, size, host)
    if not staging: self._blocks.append(block)
    return block

  def _destroy_block(self, block):
    if block in self._blocks: self._blocks.remove(block)
    block.host = None
    if block.memory is not None:
      self.vk.vkDestroyBuffer(self.handle, block.buffer, None)
      self.vk.vkFreeMemory(self.handle, block.memory, None)   # unmaps too
      block.memory = None

  def _segments(self, mem, offset, nbytes):
    """(block, block offset, offset into the range, length) covering bytes [offset, offset+nbytes) of mem."""
    if offset < 0 or nbytes < 0 or offset + nbytes > mem.nbytes:
      raise ValueError(f"bytes [{offset}, {offset + nbytes}) are outside a Memory of {mem.nbytes} bytes")
    if not mem.pieces and nbytes: raise ValueError("the Memory was freed")
    out, at = [], offset
    while at < offset + nbytes:
      k, inside = divmod(at, self.window)
      block, off, _ = mem.pieces[k]
      n = min(self.window - inside, offset + nbytes - at)
      out.append((block, off + inside, at - offset, n))
      at += n
    return out

  def upload(self, mem, data, offset=0):
    """Copy an array's bytes into mem at byte `offset`."""
    src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    segments = self._segments(mem, offset, src.nbytes)
    if self.unified:
      if id(mem) in self._in_use: self.flush()   # pending commands read or write it
      for block, boff, at, n in segments: block.host[boff:boff + n] = src[at:at + n]
    else:
      self._staged(mem, segments, src, to_device=True)

  def download(self, mem, dtype, count=None, offset=0):
    """`count` elements of `dtype` from mem at byte `offset` (all that fit by default), as a new array."""
    dtype = np.dtype(dtype)
    if count is None: count = (mem.nbytes - offset) // dtype.itemsize
    out = np.empty(count, dtype)
    dst = out.view(np.uint8)
    segments = self._segments(mem, offset, dst.nbytes)
    if self.unified:
      if id(mem) in self._in_use: self.flush()
      for block, boff, at, n in segments: dst[at:at + n] = block.host[boff:boff + n]
    else:
      self._staged(mem, segments, dst, to_device=False)
    return out

  def _staged(self, mem, segments, host, to_device):
    """Move bytes between host and device-local memory through the host-visible staging block,
    as many segments per submit as it holds."""
    if self._staging is None:
      self._staging = self._new_block(min(self.block_size, 64 << 20), staging=True)
    stage, cap = self._staging, self._staging.size
    chunks = [(block, boff + i, at + i, min(cap, n - i)) for block, boff, at, n in segments for i in range(0, n, cap)]
    while chunks:
      batch, used = [], 0
      while chunks and used + chunks[0][3] <= cap:
        batch.append(chunks.pop(0) + (used,))
        used += batch[-1][3]
      self._begin()
      self._sync([] if to_device else [mem], [mem] if to_device else [])   # the segments are disjoint: no barrier between them
      for block, boff, at, n, s in batch:
        if to_device: stage.host[s:s + n] = host[at:at + n]
        src, dst, region = (stage, block, (s, boff, n)) if to_device else (block, stage, (boff, s, n))
        self._record_copy(src.buffer, dst.buffer, [region])
      self.flush()
      if not to_device:
        for block, boff, at, n, s in batch: host[at:at + n] = stage.host[s:s + n]

  # ---- kernels

  def kernel(self, name, src, nbindings, push_size=0):
    """A Kernel for GLSL 450 compute source `src` reading/writing `nbindings` storage buffers
    (set 0, bindings 0..nbindings-1) with `push_size` bytes of push constants. Compiled SPIR-V and
    pipelines are cached (memory, disk, the driver's pipeline cache)."""
    key = (src, nbindings, push_size)
    found = self._kernels.get(key)
    if found is not None: return found
    if nbindings > self.caps.max_storage_buffers:
      raise ValueError(f"kernel {name!r} binds {nbindings} storage buffers; {self.caps.name} allows {self.caps.max_storage_buffers}")
    if push_size % 4 or push_size > self.caps.max_push_constants_size:
      raise ValueError(f"kernel {name!r}: {push_size} bytes of push constants (a multiple of 4, at most {self.caps.max_push_constants_size})")
    spirv = self._compiler().compile(name, src, self._device_key)
    vk, dev = self.vk, self.handle
    module = c_uint64(0)
    code = ctypes.create_string_buffer(spirv, len(spirv))
    vk.vkCreateShaderModule(dev, byref(VkShaderModuleCreateInfo(codeSize=len(spirv), pCode=addressof(code))), None, byref(module))
    try:
      set_layout, layout = self._layout(nbindings, push_size)
      stage = VkPipelineShaderStageCreateInfo(stage=STAGE_COMPUTE_SHADER_BIT, module=module.value, pName=b"main")
      info = VkComputePipelineCreateInfo(stage=stage, layout=layout, basePipelineIndex=-1)
      fb, fb_stage = VkPipelineCreationFeedback(), VkPipelineCreationFeedback()
      fb_info = VkPipelineCreationFeedbackCreateInfo(pPipelineCreationFeedback=addressof(fb), pipelineStageCreationFeedbackCount=1,
                                                     pPipelineStageCreationFeedbacks=addressof(fb_stage))
      if self.feedback: info.pNext = addressof(fb_info)
      pipeline = c_uint64(0)
      vk.vkCreateComputePipelines(dev, self._pipeline_cache, 1, byref(info), None, byref(pipeline))
    finally:
      vk.vkDestroyShaderModule(dev, module.value, None)   # the pipeline keeps what it needs
    self.stats["pipelines"] += 1
    if fb.flags & FEEDBACK_VALID and fb.flags & FEEDBACK_CACHE_HIT: self.stats["pipeline_cache_hits"] += 1
    self._pipeline_cache_dirty = True
    found = self._kernels[key] = Kernel(name, pipeline.value, layout, set_layout, nbindings, push_size)
    return found

  def _compiler(self):
    if self.compiler is None: self.compiler = GLSLCompiler(self.cache_dir)
    return self.compiler

  @property
  def _device_key(self): return f"{self.caps.name}|{self.caps.driver_version}|{self.caps.driver_info}|{self.caps.api_version}"

  def precompile(self, items):
    """Compile the GLSL sources [(name, src)] to SPIR-V in parallel, so that kernel() on them only
    creates pipelines (a schedule's new kernels, before its first runs)."""
    self._compiler().compile_many(items, self._device_key)

  def _layout(self, nbindings, push_size):
    set_layout = self._set_layouts.get(nbindings)
    if set_layout is None:
      bindings = (VkDescriptorSetLayoutBinding * max(nbindings, 1))(*[
        VkDescriptorSetLayoutBinding(binding=i, descriptorType=DESCRIPTOR_STORAGE_BUFFER, descriptorCount=1, stageFlags=STAGE_COMPUTE_SHADER_BIT)
        for i in range(nbindings)])
      out = c_uint64(0)
      self.vk.vkCreateDescriptorSetLayout(self.handle, byref(VkDescriptorSetLayoutCreateInfo(bindingCount=nbindings, pBindings=addressof(bindings))),
                                          None, byref(out))
      set_layout = self._set_layouts[nbindings] = out.value
    layout = self._layouts.get((nbindings, push_size))
    if layout is None:
      sets = c_uint64(set_layout)
      push = VkPushConstantRange(stageFlags=STAGE_COMPUTE_SHADER_BIT, offset=0, size=push_size)
      out = c_uint64(0)
      self.vk.vkCreatePipelineLayout(self.handle, byref(VkPipelineLayoutCreateInfo(
        setLayoutCount=1, pSetLayouts=addressof(sets), pushConstantRangeCount=1 if push_size else 0, pPushConstantRanges=addressof(push))),
        None, byref(out))
      layout = self._layouts[(nbindings, push_size)] = out.value
    return set_layout, layout

  def save_pipeline_cache(self):
    """Write the driver's pipeline cache to disk (done on close) if new pipelines were made."""
    if not self._pipeline_cache_dirty or self.handle is None: return
    self._pipeline_cache_dirty = False
    size = c_size_t(0)
    self.vk.vkGetPipelineCacheData(self.handle, self._pipeline_cache, byref(size), None)
    data = ctypes.create_string_buffer(size.value)
    self.vk.vkGetPipelineCacheData(self.handle, self._pipeline_cache, byref(size), data)
    path = self._pipeline_cache_path
    try:
      write_cache_file(path, data.raw[:size.value])
    except OSError as e:
      log.warning(f"Vulkan: cannot write the pipeline cache {path} ({e})")

  # ---- recording and submitting

  def _begin(self):
    if self._recording: return self._cmd
    self.vk.vkBeginCommandBuffer(self._cmd, byref(VkCommandBufferBeginInfo(flags=0x1)))   # one-time submit
    if self.profiling: self.vk.vkCmdResetQueryPool(self._cmd, self._query_pool, 0, 2 * self._timed)
    self._recording, self._pipeline_bound, self._labels = True, None, []
    return self._cmd

  def _barrier(self, src_stages, src_access, dst_stages, dst_access):
    b = VkMemoryBarrier(srcAccessMask=src_access, dstAccessMask=dst_access)
    self.vk.vkCmdPipelineBarrier(self._cmd, src_stages, dst_stages, 0, 1, byref(b), 0, None, 0, None)

  def _sync(self, reads, writes):
    """Track what this command touches; a barrier first if it depends on a command since the last one."""
    for m in (*reads, *writes):
      if not m.pieces: raise ValueError("a freed Memory was passed to a command")
    r, w = {id(m) for m in reads}, {id(m) for m in writes}
    if (r | w) & self._written or w & self._read:
      self._barrier(PIPE_COMPUTE | PIPE_TRANSFER, ACCESS_SHADER_WRITE | ACCESS_TRANSFER_WRITE, PIPE_COMPUTE | PIPE_TRANSFER, ALL_READ_WRITE)
      self.stats["barriers"] += 1
      self._written, self._read = set(), set()
    self._read |= r
    self._written |= w
    self._wrote = self._wrote or bool(w)
    for m in (*reads, *writes): self._in_use[id(m)] = m   # kept alive (and not reused) until the flush

  def dispatch(self, kernel, groups, bindings, push=b"", writes=(0,), name=None):
    """Record kernel over `groups` workgroups (x[, y[, z]]) with `bindings` (Memory objects, each
    taking as many consecutive bindings as it has pieces) and `push` (bytes) as push constants.
    writes: positions in `bindings` the kernel writes; the rest are only read."""
    groups = tuple(int(g) for g in groups) + (1,) * (3 - len(groups))
    if min(groups) <= 0: return
    limit = self.caps.max_workgroup_count
    if any(g > m for g, m in zip(groups, limit)):
      raise ValueError(f"kernel {kernel.name!r}: {groups} workgroups exceed {self.caps.name}'s limit {limit}")
    if any(not m.pieces for m in bindings): raise ValueError(f"kernel {kernel.name!r}: a freed Memory was passed as a binding")
    windows = [(block.buffer, off, size) for m in bindings for block, off, size in m.pieces]
    if len(windows) != kernel.nbindings:
      raise ValueError(f"kernel {kernel.name!r} takes {kernel.nbindings} bindings; got {len(windows)} from {len(bindings)} Memory objects")
    push = bytes(push)
    if len(push) != kernel.push_size:
      raise ValueError(f"kernel {kernel.name!r} takes {kernel.push_size} bytes of push constants, got {len(push)}")
    if self.profiling and len(self._labels) == self._timed: self.flush()   # the query pool is full
    cmd = self._begin()
    self._sync(bindings, [bindings[i] for i in writes])
    vk = self.vk
    if self._pipeline_bound != kernel.pipeline:
      vk.vkCmdBindPipeline(cmd, BIND_POINT_COMPUTE, kernel.pipeline)
      self._pipeline_bound = kernel.pipeline
    if windows:
      ds = c_uint64(self._descriptor_set(kernel, windows))
      vk.vkCmdBindDescriptorSets(cmd, BIND_POINT_COMPUTE, kernel.layout, 0, 1, byref(ds), 0, None)
    if push: vk.vkCmdPushConstants(cmd, kernel.layout, STAGE_COMPUTE_SHADER_BIT, 0, len(push), push)
    if self.profiling:
      q = 2 * len(self._labels)
      self._labels.append(name or kernel.name)
      vk.vkCmdWriteTimestamp(cmd, PIPE_BOTTOM, self._query_pool, q)   # when the commands before have finished
      vk.vkCmdDispatch(cmd, *groups)
      vk.vkCmdWriteTimestamp(cmd, PIPE_BOTTOM, self._query_pool, q + 1)
    else:
      vk.vkCmdDispatch(cmd, *groups)
    self.stats["dispatches"] += 1

  def _descriptor_set(self, kernel, windows):
    """A descriptor set for this dispatch, from pools that are reset after each flush."""
    n = len(windows)
    sets_left, descriptors_left = self._pool_left
    if sets_left < 1 or descriptors_left < n:
      self._pool_at += 1
      if self._pool_at == len(self._pools):
        size = VkDescriptorPoolSize(type=DESCRIPTOR_STORAGE_BUFFER, descriptorCount=max(POOL_DESCRIPTORS, n))
        pool = c_uint64(0)
        self.vk.vkCreateDescriptorPool(self.handle, byref(VkDescriptorPoolCreateInfo(maxSets=POOL_SETS, poolSizeCount=1, pPoolSizes=addressof(size))),
                                       None, byref(pool))
        self._pools.append((pool.value, max(POOL_DESCRIPTORS, n)))
      sets_left, descriptors_left = POOL_SETS, self._pools[self._pool_at][1]
    self._pool_left = (sets_left - 1, descriptors_left - n)
    layouts = c_uint64(kernel.set_layout)
    ds = c_uint64(0)
    self.vk.vkAllocateDescriptorSets(self.handle, byref(VkDescriptorSetAllocateInfo(
      descriptorPool=self._pools[self._pool_at][0], descriptorSetCount=1, pSetLayouts=addressof(layouts))), byref(ds))
    infos = (VkDescriptorBufferInfo * n)(*[VkDescriptorBufferInfo(buffer=b, offset=o, range=r) for b, o, r in windows])
    writes = (VkWriteDescriptorSet * n)(*[VkWriteDescriptorSet(dstSet=ds.value, dstBinding=i, descriptorCount=1, descriptorType=DESCRIPTOR_STORAGE_BUFFER,
                                                               pBufferInfo=addressof(infos) + i * ctypes.sizeof(VkDescriptorBufferInfo))
                                          for i in range(n)])
    self.vk.vkUpdateDescriptorSets(self.handle, n, writes, 0, None)
    return ds.value

  def _record_copy(self, src_buffer, dst_buffer, regions):
    """Record a buffer copy (the caller has begun recording and synced)."""
    arr = (VkBufferCopy * len(regions))(*[VkBufferCopy(srcOffset=s, dstOffset=d, size=n) for s, d, n in regions])
    self.vk.vkCmdCopyBuffer(self._cmd, src_buffer, dst_buffer, len(regions), arr)

  def copy(self, dst, src, nbytes=None):
    """Record a device copy of nbytes (all of src by default) from src to dst."""
    nbytes = src.nbytes if nbytes is None else nbytes
    if nbytes == 0: return
    s_seg, d_seg = self._segments(src, 0, nbytes), self._segments(dst, 0, nbytes)
    assert [(a, n) for _, _, a, n in s_seg] == [(a, n) for _, _, a, n in d_seg]   # same window: the pieces line up
    self._begin()
    self._sync([src], [dst])
    for (sb, so, _, n), (db, do, _, _) in zip(s_seg, d_seg): self._record_copy(sb.buffer, db.buffer, [(so, do, n)])

  def fill(self, mem, value=0):
    """Record filling all of mem (whole 32-bit words) with the 32-bit pattern `value`."""
    cmd = self._begin()
    self._sync([], [mem])
    for block, off, size in mem.pieces: self.vk.vkCmdFillBuffer(cmd, block.buffer, off, size, value & 0xFFFFFFFF)

  def flush(self):
    """Submit what was recorded, once, and wait for it; then pending frees are done and, when
    profiling, `timings` holds (label, seconds) per dispatch."""
    if not self._recording: return
    vk, cmd = self.vk, self._cmd
    if self._wrote:   # the host may read what the device wrote
      self._barrier(PIPE_COMPUTE | PIPE_TRANSFER, ACCESS_SHADER_WRITE | ACCESS_TRANSFER_WRITE, PIPE_HOST, ACCESS_HOST_READ)
    vk.vkEndCommandBuffer(cmd)
    self._recording = False
    cmds = c_void_p(cmd)
    try:
      vk.vkQueueSubmit(self.queue, 1, byref(VkSubmitInfo(commandBufferCount=1, pCommandBuffers=addressof(cmds))), self._fence)
      self.stats["submits"] += 1
      fence = c_uint64(self._fence)
      vk.vkWaitForFences(self.handle, 1, byref(fence), 1, 0xFFFFFFFFFFFFFFFF)
      vk.vkResetFences(self.handle, 1, byref(fence))
      self.timings = self._read_timings() if self.profiling and self._labels else []
    finally:
      vk.vkResetCommandBuffer(cmd, 0)
      for pool, _ in self._pools[:self._pool_at + 1]: vk.vkResetDescriptorPool(self.handle, pool, 0)
      self._pool_at, self._pool_left = -1, (0, 0)
      self._written, self._read, self._in_use, self._wrote, self._recycled = set(), set(), {}, False, False
      deferred, self._deferred = self._deferred, []
      for pieces in deferred: self._release(pieces)
      if not deferred: self._release(())   # blocks emptied while recording go back now

  synchronize = flush

  def _read_timings(self):
    n = 2 * len(self._labels)
    ticks = (c_uint64 * n)()
    self.vk.vkGetQueryPoolResults(self.handle, self._query_pool, 0, n, ctypes.sizeof(ticks), ticks, 8, QUERY_RESULT_64_WAIT)
    mask = (1 << self.caps.timestamp_bits) - 1 if self.caps.timestamp_bits < 64 else (1 << 64) - 1
    period = self.caps.timestamp_period * 1e-9
    return [(label, ((ticks[2 * i + 1] - ticks[2 * i]) & mask) * period) for i, label in enumerate(self._labels)]

  # ---- teardown

  def close(self):
    """Wait for the device, save the pipeline cache, and destroy everything (safe to call twice)."""
    atexit.unregister(self.close)
    vk, dev = self.vk, self.handle
    if dev is not None:
      try:
        self.flush()
      except Exception as e:   # a lost device still gets torn down
        log.warning(f"Vulkan: flush at close failed ({e})")
      vk.vkDeviceWaitIdle(dev)
      self.save_pipeline_cache()
      for k in self._kernels.values(): vk.vkDestroyPipeline(dev, k.pipeline, None)
      for layout in self._layouts.values(): vk.vkDestroyPipelineLayout(dev, layout, None)
      for set_layout in self._set_layouts.values(): vk.vkDestroyDescriptorSetLayout(dev, set_layout, None)
      for pool, _ in self._pools: vk.vkDestroyDescriptorPool(dev, pool, None)
      if self._query_pool: vk.vkDestroyQueryPool(dev, self._query_pool, None)
      vk.vkDestroyPipelineCache(dev, self._pipeline_cache, None)
      vk.vkDestroyFence(dev, self._fence, None)
      vk.vkDestroyCommandPool(dev, self._command_pool, None)
      for b in list(self._blocks) + ([self._staging] if self._staging else []): self._destroy_block(b)
      self._kernels, self._layouts, self._set_layouts, self._pools = {}, {}, {}, []
      vk.vkDestroyDevice(dev, None)
      self.handle = None
    self.instance.close()

  @property
  def validation_messages(self): return self.instance.messages


def _chain(structs):
  """Link structs through pNext (each keeps the next's address; the caller keeps them alive); the head's address."""
  for a, b in zip(structs, structs[1:]): a.pNext = addressof(b)
  return addressof(structs[0]) if structs else None
