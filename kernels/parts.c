/* parts.c: the worker threads that run the NumPy backend's compiled loops in parts, one part per
   core (minift/backends/numpy/parallel.py drives it; built with the C loops' compiler).

   Every compiled loop has one signature, void fn(const intptr_t* args, long lo, long hi): its
   arguments (addresses and whole numbers) packed in an array, and the range [lo, hi) of its
   outermost loop that this call runs. PARTS_RUN(fn, args, cuts, parts) runs part 0,
   [cuts[0], cuts[1]), on the calling thread and offers part i to worker i - 1; once its own part
   is done the caller runs every part that no worker has started, then waits for the rest.

   Why not Python threads: handing a part to a sleeping thread through a queue and waking it
   took ~100 us on a 2-core VM, as long as a decode step's gemv itself. Here a worker keeps
   looking for its next part for SPIN_NS before it sleeps (OpenBLAS keeps its threads spinning
   the same way): a model's kernels come tens of microseconds apart, so the next part usually
   finds it awake. It pauses at first, then yields the core while it looks, so that OpenBLAS's
   threads (a matmul between two parted loops) run first. */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define MAX_WORKERS 255
#define SPIN_NS 100000L
#define YIELD_AFTER 256      /* pauses (~10 us) before the spinning gives way to other threads */

typedef void (*part_fn)(const intptr_t* args, long lo, long hi);

typedef struct {
  long go, claimed, done;        /* job numbers: the part of job `go` is run by whoever first moves `claimed` to it, who then sets done */
  part_fn fn;
  const intptr_t* args;
  long lo, hi;
  pthread_mutex_t lock;          /* with wake: where a worker that stopped spinning sleeps */
  pthread_cond_t wake;
  int started;
} worker;

static worker workers[MAX_WORKERS];
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;   /* one caller at a time; another runs all its parts itself */
static int fork_handler;

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#endif
}

/* Job `go`'s part, for whoever asks first: its worker, or the caller once its own part is done
   (a worker that has no core, say while OpenBLAS's threads spin on both, costs no more than
   running that part on the caller) */
static int claim(worker* w, long go) {
  long unclaimed = go - 1;
  return __atomic_compare_exchange_n(&w->claimed, &unclaimed, go, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static void* work(void* arg) {
  worker* w = arg;
  long seen = 0;
  for (;;) {
    long go, until = now_ns() + SPIN_NS;
    for (int n = 1; (go = __atomic_load_n(&w->go, __ATOMIC_ACQUIRE)) == seen; n++) {
      if (n < YIELD_AFTER) relax();
      else sched_yield();   /* a thread that has work on this core (BLAS's) runs first */
      if (n % 64 == 0 && now_ns() > until) {
        pthread_mutex_lock(&w->lock);
        while ((go = __atomic_load_n(&w->go, __ATOMIC_ACQUIRE)) == seen) pthread_cond_wait(&w->wake, &w->lock);
        pthread_mutex_unlock(&w->lock);
        break;
      }
    }
    seen = go;
    if (claim(w, go)) {
      w->fn(w->args, w->lo, w->hi);
      __atomic_store_n(&w->done, go, __ATOMIC_RELEASE);
    }
  }
  return 0;
}

/* a forked child has none of the threads: they are started again when asked for */
static void forget(void) {
  memset(workers, 0, sizeof workers);
  pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
  busy = fresh;
}

static int start(worker* w) {
  pthread_mutex_init(&w->lock, 0);
  pthread_cond_init(&w->wake, 0);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t thread;
  int failed = pthread_create(&thread, &attr, work, w);
  pthread_attr_destroy(&attr);
  if (failed) return 0;
  w->started = 1;
  return 1;
}

/* Returns the parts that ran on workers (parts - 1, or fewer where a thread could not be made or
   another call was running: the caller ran those parts itself). */
int PARTS_RUN(part_fn fn, const intptr_t* args, const long* cuts, int parts) {
  int helped = 0, locked = pthread_mutex_trylock(&busy) == 0;
  if (locked) {
    if (!fork_handler) fork_handler = pthread_atfork(0, 0, forget) == 0;
    for (; helped < parts - 1 && helped < MAX_WORKERS; helped++) {
      worker* w = &workers[helped];
      if (!w->started && !start(w)) break;
      w->fn = fn; w->args = args; w->lo = cuts[helped + 1]; w->hi = cuts[helped + 2];
      pthread_mutex_lock(&w->lock);
      __atomic_store_n(&w->go, w->go + 1, __ATOMIC_RELEASE);
      pthread_cond_signal(&w->wake);
      pthread_mutex_unlock(&w->lock);
    }
  }
  fn(args, cuts[0], cuts[1]);
  for (int i = helped + 1; i < parts; i++) fn(args, cuts[i], cuts[i + 1]);   /* the parts no worker was given */
  for (int i = 0; i < helped; i++) {   /* parts not started yet: run here */
    worker* w = &workers[i];
    if (claim(w, w->go)) { fn(args, cuts[i + 1], cuts[i + 2]); __atomic_store_n(&w->done, w->go, __ATOMIC_RELEASE); }
  }
  for (int i = 0; i < helped; i++)
    for (int n = 1; __atomic_load_n(&workers[i].done, __ATOMIC_ACQUIRE) != workers[i].go; n++) {
      if (n < YIELD_AFTER) relax();
      else sched_yield();   /* the worker running it may be waiting for this core */
    }
  if (locked) pthread_mutex_unlock(&busy);
  return helped;
}
