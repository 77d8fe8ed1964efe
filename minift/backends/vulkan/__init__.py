"""The Vulkan backend (every Android phone since 7.0; Mesa's lavapipe in CI): needs the system Vulkan
loader and a GLSL compiler (glslangValidator or glslc) on PATH; no Python package.

  vk.py       the Vulkan API through ctypes, only what compute needs: instance and device choice,
              caps, memory sub-allocated from a few blocks, SPIR-V and pipeline caches, recording
              dispatches into one command buffer with barriers where they depend, timestamps
  device.py   VulkanDevice: the minift Device (memory, building, one submit per realize)
  codegen.py  the GLSL 450 dialect and the kernel kinds (one invocation per output, workgroup
              reductions, the matmul of kernels/matmul.comp specialised by defines)
"""
from minift.backends.vulkan.device import VulkanDevice
