// Runtime of the CUDA emulation (cuda_emulation.h): fibers, the block scheduler and its checks,
// shared memory, launch checks and garbage-filled allocations; in the traced build
// (CONTRASTMASK_EMU_TRACE), the memory-access hooks and their warp-level accounting.
#include "cuda_emulation.h"

// splitmix64 (csrc/ is on the include path): the key sampler's mixer also drives the emulator's own random
// streams (fiber orders, garbage bytes), which decide no result the tests compare.
#include "contrastmask/sampling.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(CONTRASTMASK_EMU_TRACE)
#define CM_EMU_TRACE 1
#else
#define CM_EMU_TRACE 0
#endif

#if defined(__x86_64__)
#define CM_EMU_ASM_SWITCH 1
#else
#define CM_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CM_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CM_EMU_ASAN 1
#endif
#endif
#ifndef CM_EMU_ASAN
#define CM_EMU_ASAN 0
#endif
#if CM_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
// Shared memory outside the block's variables (static) or past the launch's size (dynamic) is
// poisoned, so AddressSanitizer reports kernel accesses there.
#define CM_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define CM_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define CM_EMU_POISON(p, n) ((void)(p), (void)(n))
#define CM_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

#if CM_EMU_ASM_SWITCH
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save and continues on the stack `load` (which was saved the same way, or built
// by new_fiber_stack()).
extern "C" void cm_emu_switch_context(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl cm_emu_switch_context
  .hidden cm_emu_switch_context
  .type cm_emu_switch_context,@function
cm_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cm_emu_switch_context,.-cm_emu_switch_context
)");
#endif

namespace contrastmask {
namespace emu {
namespace {

struct Site {
  const char* file = nullptr;
  int line = 0;
};
bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || (a.file && b.file && strcmp(a.file, b.file) == 0));
}
std::string where(const Site& s) {
  const char* f = s.file ? s.file : "?";
  const char* slash = strrchr(f, '/');
  return std::string(slash ? slash + 1 : f) + ":" + std::to_string(s.line);
}

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

const char* warp_op_name(int op) {
  switch (op) {
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kBallot: return "__ballot_sync";
    default: return "__syncwarp";
  }
}

#if CM_EMU_ASAN
constexpr size_t kStackSize = 1024 * 1024;
#else
constexpr size_t kStackSize = 128 * 1024;
#endif

// A saved context: the stack pointer (the assembly switch keeps the registers on the stack), or a ucontext.
#if CM_EMU_ASM_SWITCH
using Context = void*;
#else
using Context = ucontext_t;
#endif

struct Fiber {
  Context context{};
  char* stack = nullptr;  // lowest usable address; kStackSize bytes
  uint3 tid{0, 0, 0};
  int linear = 0;
  State state = State::kReady;
  Site site;
  // Barrier: predicate in, result out. Warp collective: operation, value, argument and result.
  int pred = 0, result = 0;
  int op = 0, arg = 0, width = 32;
  uint64_t value = 0, out = 0;
};

struct Warp {
  int size = 0, arrived = 0, exited = 0;
  Site site;
  int op = 0;
  int first = -1;  // linear index of the first lane to arrive
};

struct KernelInfo {
  int max_dynamic = -1;     // cudaFuncAttributeMaxDynamicSharedMemorySize, -1 = never set
  size_t static_bytes = 0;  // largest static shared memory seen in a block of this kernel
};

struct SharedSite {
  const void* site;
  size_t offset, bytes;
};

struct Stats {
  int64_t launches = 0, blocks = 0, fibers = 0, switches = 0, attribute_sets = 0;
};

#if CM_EMU_TRACE
// ---------------------------------------------------------------- traced build: records

// One load, store or atomic of a kernel thread, as its hook saw it (return address = the instruction).
enum AccessKind : uint8_t { kLoad = 0, kStore = 1, kAtomic = 2 };
enum Space : uint8_t { kGlobal = 0, kShared = 1, kParam = 2 };
struct Access {
  uintptr_t pc, addr;
  uint32_t size;
  uint8_t kind;
  uint8_t space;  // set after the block
};
// The accesses of one fiber in the current block. Accesses to its own stack (locals, the host
// compiler's register spills) are only counted: they have no GPU counterpart worth a model.
struct FiberLog {
  uintptr_t stack_lo = 0;
  int suppress = 0;  // inside an atomic: its emulating load and store are not recorded
  uint64_t local[2] = {0, 0};
  std::vector<Access> log;
};

// Per launch and (instruction, address space): warp-level requests and what they cost.
struct LineStats {
  uint8_t kind = 0, space = 0;
  uint64_t requests = 0, lanes = 0, bytes = 0;
  uint64_t sectors = 0, ideal_sectors = 0, max_sectors = 0;  // global: 32-byte sectors per request
  std::unordered_set<uint64_t> distinct;                      // global: sectors touched over the launch
  uint64_t wavefronts = 0, ideal_wavefronts = 0, max_degree = 0;  // shared: bank-conflict degree
  uint64_t same_address_max = 0;  // atomics: most lanes of one request on one address
};
struct LineKey {
  uintptr_t pc;
  uint8_t space;
  bool operator==(const LineKey& o) const { return pc == o.pc && space == o.space; }
};
struct LineKeyHash {
  size_t operator()(const LineKey& k) const { return std::hash<uintptr_t>()(k.pc * 4 + k.space); }
};
struct LaunchTrace {
  std::string name, site;
  dim3 grid, block;
  size_t dynamic_shared = 0, static_shared = 0;
  uintptr_t func = 0;
  uint64_t blocks = 0, threads = 0, barriers = 0, warp_collectives = 0;
  uint64_t local[2] = {0, 0}, param[2] = {0, 0};
  std::map<std::string, uint64_t> barrier_sites;
  std::unordered_map<LineKey, LineStats, LineKeyHash> lines;
  std::unordered_set<uint64_t> distinct;  // global sectors over the launch
};

// The fiber whose accesses are recorded now, on this host thread (null outside a kernel or when not
// tracing).
thread_local FiberLog* tl_log = nullptr;

inline void record(const void* p, size_t n, uint8_t kind, const void* pc) {
  FiberLog* f = tl_log;
  if (!f || f->suppress) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - f->stack_lo < kStackSize) {
    ++f->local[kind & 1];
    return;
  }
  f->log.push_back(Access{reinterpret_cast<uintptr_t>(pc), a, static_cast<uint32_t>(n), kind, kGlobal});
}
#endif

// Garbage: all-ones bytes (NaN in every float dtype, -1 in every signed integer) under the forward
// and reverse orders, random bytes under the random order.
void fill_garbage(void* p, size_t n, int order, uint64_t salt) {
  if (order != kRandom) {
    memset(p, 0xff, n);
    return;
  }
  unsigned char* b = static_cast<unsigned char*>(p);
  uint64_t state = splitmix64(salt);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    state = splitmix64(state);
    memcpy(b + i, &state, 8);
  }
  state = splitmix64(state);
  for (; i < n; ++i) b[i] = static_cast<unsigned char>(state >> (8 * (i % 8)));
}

struct Runtime {
  std::mutex launch_mutex;  // one launch at a time in the process
  int order = kForward;
  uint64_t seed = 0;
  uint64_t launch_index = 0;
  std::map<const void*, KernelInfo> kernels;
  Stats stats;

  // Current launch and block.
  const LaunchConfig* config = nullptr;
  KernelInfo* kernel = nullptr;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  size_t context_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<char*> stacks;
  int threads = 0, ready = 0, live = 0, exited = 0, at_barrier = 0;
  Site barrier_site;
  int barrier_first = -1, first_exited = -1;
  Fiber* current = nullptr;
  bool failed = false;
  std::string error;
  std::mt19937_64 rng;
  std::vector<int> order_buf;

  // Shared memory of the current block.
  std::vector<SharedSite> shared_sites;
  char* static_arena = nullptr;
  size_t static_used = 0, static_filled = 0;
  char* dynamic_arena = nullptr;

  Context scheduler_context{};
#if CM_EMU_ASM_SWITCH
  uint64_t fp_control = 0;  // MXCSR | x87 control word << 32, for new fibers
#endif
  // The scheduler's stack as ASan learns it on the first switch back (read under ASan only).
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#if CM_EMU_TRACE
  bool tracing = false;
  std::vector<FiberLog> logs;  // per thread of the current block
  std::vector<LaunchTrace> launches;
#endif

  Runtime() {
    static_arena = static_cast<char*>(aligned_alloc(256, kMaxStaticShared));
    dynamic_arena = static_cast<char*>(aligned_alloc(256, kMaxSharedPerBlock));
  }
};

Runtime& rt() {
  static Runtime* r = new Runtime();  // never destroyed: fibers may hold pointers into it at exit
  return *r;
}

std::string thread_name(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.tid.x << "," << f.tid.y << "," << f.tid.z << ")";
  return s.str();
}

// ---------------------------------------------------------------- context switches

void fiber_start();

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                 0);
  TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
  return static_cast<char*>(p) + page;
}

void prepare_fiber(Fiber& f) {
  Runtime& r = rt();
  // AddressSanitizer: a fiber never returns from its outermost frames (it switches away for good), so
  // their redzones stay poisoned on the stack it leaves; clear the top of the stack for the next one.
  // (After a failed block, run_launch clears whole stacks: abandoned fibers can be deeper.)
  constexpr size_t kStackTop = 32 * 1024;
  CM_EMU_UNPOISON(f.stack + kStackSize - kStackTop, kStackTop);
#if CM_EMU_ASM_SWITCH
  uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + kStackSize);  // 16-byte aligned
  top[-1] = 0;                                                         // fiber_start's return address
  top[-2] = reinterpret_cast<uint64_t>(&fiber_start);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;                            // rbp, rbx, r12..r15
  top[-9] = r.fp_control;
  f.context = top - 9;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackSize;
  f.context.uc_link = nullptr;
  makecontext(&f.context, &fiber_start, 0);
#endif
}

// One switch of context: the running one saved in save, load's loaded; ASan is told the stack it lands on
// (load_stack), and keeps none for a fiber that is exiting.
void switch_context(Context* save, Context* load, const void* load_stack, size_t load_stack_size,
                    bool exiting = false) {
#if CM_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, load_stack, load_stack_size);
#endif
#if CM_EMU_ASM_SWITCH
  cm_emu_switch_context(save, *load);
#else
  swapcontext(save, load);
#endif
#if CM_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  (void)load_stack, (void)load_stack_size, (void)exiting;
}

// Scheduler -> fiber.
void resume(Fiber& f) {
  Runtime& r = rt();
  r.current = &f;
  threadIdx = f.tid;
  ++r.stats.switches;
#if CM_EMU_TRACE
  if (r.tracing) tl_log = &r.logs[f.linear];
#endif
  switch_context(&r.scheduler_context, &f.context, f.stack, kStackSize);
#if CM_EMU_TRACE
  tl_log = nullptr;
#endif
  r.current = nullptr;
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber (never when `exiting`).
void yield(bool exiting = false) {
  Runtime& r = rt();
  Fiber& f = *r.current;
  switch_context(&f.context, &r.scheduler_context, r.scheduler_stack_bottom, r.scheduler_stack_size, exiting);
}

// Records the block's first error and leaves the fiber for good (its stack holds only the kernel's
// trivially destructible locals).
[[noreturn]] void fail_in_fiber(const std::string& message) {
  Runtime& r = rt();
  if (!r.failed) {
    r.failed = true;
    r.error = message;
  }
  yield(/*exiting=*/true);
  __builtin_unreachable();
}

void thread_exited(Fiber& f) {
  Runtime& r = rt();
  f.state = State::kDone;
  --r.ready;
  --r.live;
  if (r.exited++ == 0) r.first_exited = f.linear;
  Warp& w = r.warps[f.linear / 32];
  ++w.exited;
  if (r.at_barrier > 0) {
    fail_in_fiber(thread_name(f) + " exited while " + std::to_string(r.at_barrier) +
                  " thread(s) of its block wait at __syncthreads (" + where(r.barrier_site) +
                  "): every thread of the block must reach each barrier");
  }
  if (w.arrived > 0) {
    fail_in_fiber(thread_name(f) + " exited while lanes of its warp wait at " + warp_op_name(w.op) + " (" +
                  where(w.site) + "): a warp collective needs every lane of its mask");
  }
}

void fiber_start() {
  Runtime& r = rt();
#if CM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#endif
  Fiber& f = *r.current;
  try {
    r.body(r.context);
  } catch (const std::exception& e) {
    fail_in_fiber(thread_name(f) + " threw: " + e.what());
  } catch (...) {
    fail_in_fiber(thread_name(f) + " threw an unknown exception");
  }
  thread_exited(f);
  yield(/*exiting=*/true);
  __builtin_unreachable();
}

// ---------------------------------------------------------------- the scheduler

void release_barrier() {
  Runtime& r = rt();
  int or_ = 0, and_ = 1, count = 0;
  for (int i = 0; i < r.threads; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state != State::kBarrier) continue;
    or_ |= f.pred != 0;
    and_ &= f.pred != 0;
    count += f.pred != 0;
  }
  for (int i = 0; i < r.threads; ++i) {
    Fiber& f = r.fibers[i];
    if (f.state != State::kBarrier) continue;
    f.result = f.op == kBarrierOr ? or_ : f.op == kBarrierAnd ? and_ : f.op == kBarrierCount ? count : 0;
    f.state = State::kReady;
  }
  r.ready += r.at_barrier;
  r.at_barrier = 0;
  r.barrier_first = -1;
}

std::string deadlock_report() {
  Runtime& r = rt();
  std::map<std::string, int> waiting;
  for (int i = 0; i < r.threads; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state == State::kBarrier) ++waiting["__syncthreads (" + where(f.site) + ")"];
    if (f.state == State::kWarp) ++waiting[std::string(warp_op_name(f.op)) + " (" + where(f.site) + ")"];
  }
  std::ostringstream s;
  s << "deadlock: no thread of the block can run;";
  for (const auto& [what, n] : waiting) s << " " << n << " wait at " << what << ";";
  if (r.exited) s << " " << r.exited << " exited";
  return s.str();
}

void run_block(uint64_t block_seed) {
  Runtime& r = rt();
  const LaunchConfig& c = *r.config;
  // Shared memory: garbage at every block start.
  r.shared_sites.clear();
  r.static_used = 0;
  CM_EMU_UNPOISON(r.static_arena, kMaxStaticShared);
  if (r.static_filled) fill_garbage(r.static_arena, r.static_filled, r.order, block_seed ^ 0x5a5a);
  CM_EMU_POISON(r.static_arena, kMaxStaticShared);
  CM_EMU_UNPOISON(r.dynamic_arena, kMaxSharedPerBlock);
  if (c.dynamic_shared) fill_garbage(r.dynamic_arena, c.dynamic_shared, r.order, block_seed ^ 0xa5a5);
  CM_EMU_POISON(r.dynamic_arena + c.dynamic_shared, kMaxSharedPerBlock - c.dynamic_shared);

  const int T = r.threads;
  for (int i = 0; i < T; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = i;
    f.tid = uint3{i % c.block.x, (i / c.block.x) % c.block.y, i / (c.block.x * c.block.y)};
    f.state = State::kReady;
    prepare_fiber(f);
  }
  for (size_t w = 0; w < r.warps.size(); ++w) {
    r.warps[w] = Warp();
    r.warps[w].size = std::min(32, T - static_cast<int>(w) * 32);
  }
#if CM_EMU_TRACE
  if (r.tracing) {
    if (r.logs.size() < static_cast<size_t>(T)) r.logs.resize(T);
    for (int i = 0; i < T; ++i) {
      FiberLog& l = r.logs[i];
      l.stack_lo = reinterpret_cast<uintptr_t>(r.fibers[i].stack);
      l.suppress = 0;
      l.local[0] = l.local[1] = 0;
      l.log.clear();
    }
  }
#endif
  r.ready = r.live = T;
  r.exited = r.at_barrier = 0;
  r.barrier_first = r.first_exited = -1;
  r.stats.fibers += T;
  ++r.stats.blocks;

  r.rng.seed(block_seed);
  std::vector<int>& order = r.order_buf;
  order.resize(T);
  while (true) {
    for (int i = 0; i < T; ++i) order[i] = r.order == kReverse ? T - 1 - i : i;
    if (r.order == kRandom) std::shuffle(order.begin(), order.end(), r.rng);
    for (int i : order) {
      if (r.fibers[i].state != State::kReady) continue;
      resume(r.fibers[i]);
      if (r.failed) return;
    }
    if (r.live == 0) return;
    if (r.ready > 0) continue;
    if (r.at_barrier == r.live) {
#if CM_EMU_TRACE
      if (r.tracing) {
        LaunchTrace& t = r.launches.back();
        ++t.barriers;
        ++t.barrier_sites[where(r.barrier_site)];
      }
#endif
      release_barrier();
      continue;
    }
    r.failed = true;
    r.error = deadlock_report();
    return;
  }
}

std::string dim_string(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

[[noreturn]] void launch_error(const LaunchConfig& c, const std::string& message) {
  TORCH_CHECK(false, "CUDA emulation: launch of ", c.name, " at ", where(Site{c.file, c.line}), " with grid ",
              dim_string(c.grid), ", block ", dim_string(c.block), ", ", c.dynamic_shared,
              " bytes of dynamic shared memory: ", message);
  __builtin_unreachable();
}

size_t dynamic_limit(const KernelInfo& k) {
  return k.max_dynamic >= 0 ? static_cast<size_t>(k.max_dynamic) : kDefaultDynamicShared - k.static_bytes;
}

std::string limit_hint() {
  return "a kernel may use at most 48 KB of shared memory (static + dynamic) unless "
         "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) raised its limit, "
         "and at most " + std::to_string(kMaxSharedPerBlock) + " bytes in all";
}

#if CM_EMU_TRACE
// ---------------------------------------------------------------- traced build: warp-level accounting

// The lanes of a warp that execute one instruction (one hook call site) together form one request,
// as a GPU's memory system sees a warp instruction; which executions go together is decided in
// trace_block().
struct LaneAccess {
  uintptr_t addr;
  uint32_t size;
  uint8_t space;
};
struct Request {
  uintptr_t pc;
  uint8_t kind;
  std::vector<LaneAccess> lanes;
};
constexpr uint32_t kNoParent = ~0u;  // before any anchor
constexpr uint32_t kAnchor = ~0u - 1;  // an anchor's own k-th execution
// The k-th execution of `pc` in a lane: of an anchor (parent kAnchor), or since the anchor execution
// that formed request `parent`.
struct RequestKey {
  uintptr_t pc;
  uint32_t parent, k;
  bool operator==(const RequestKey& o) const { return pc == o.pc && parent == o.parent && k == o.k; }
};
struct RequestKeyHash {
  size_t operator()(const RequestKey& q) const {
    return std::hash<uintptr_t>()(q.pc) ^ splitmix64((uint64_t(q.parent) << 32) | q.k);
  }
};
struct PcInfo {
  uint32_t mask = 0;          // lanes that execute the instruction
  uint32_t min = 0, max = 0;  // executions per lane, over those lanes
  uint32_t first = ~0u;       // earliest position in a lane's accesses
  bool demoted = false;       // a candidate whose executions do not pair by index
  bool mismatch = false;
  bool candidate() const { return max - min <= 1; }
  bool anchor() const { return !demoted && candidate(); }
};
struct RecentAnchor {
  uintptr_t pc;
  uint32_t mask, index, request;
};
// The context of an anchor's execution: the latest execution of an anchor (covering its lanes) before
// it. Lanes that come from their last executions of anchors are in the same context, whatever those
// were: past a loop they left after n or n + 1 trips, or past the last trip ending in different branches.
struct Ref {
  uintptr_t pc = 0;
  uint32_t index = 0;
  bool last = false;
  bool set = false;
};
bool same_context(const Ref& a, const Ref& b) { return (a.last && b.last) || (a.pc == b.pc && a.index == b.index); }

bool inside(uintptr_t a, const void* p, size_t n) { return a - reinterpret_cast<uintptr_t>(p) < n; }

// Kernel parameters (the launch's argument block) and the builtins threadIdx, blockIdx, blockDim and
// gridDim: constant memory and special registers on a GPU, not global memory.
bool is_param(const Runtime& r, uintptr_t a) {
  return inside(a, r.context, r.context_bytes) || inside(a, &threadIdx, sizeof threadIdx) ||
         inside(a, &blockIdx, sizeof blockIdx) || inside(a, &blockDim, sizeof blockDim) ||
         inside(a, &gridDim, sizeof gridDim);
}

// Adds one request's lanes in `space` to its line: 32-byte sectors (global) or bank wavefronts (shared).
void account(LaunchTrace& t, const Request& q, uint8_t space, std::vector<uint64_t>& units,
             std::vector<std::pair<uintptr_t, uintptr_t>>& ranges) {
  LineStats& s = t.lines[LineKey{q.pc, space}];
  s.kind = q.kind;
  s.space = space;
  ranges.clear();
  for (const LaneAccess& l : q.lanes) {
    if (l.space != space) continue;
    s.bytes += l.size;
    ranges.emplace_back(l.addr, l.addr + l.size);
  }
  ++s.requests;
  s.lanes += ranges.size();
  std::sort(ranges.begin(), ranges.end());
  uint64_t distinct_bytes = 0, same = 0, most = 0;
  uintptr_t end = 0, last = ~uintptr_t(0);
  for (const auto& [a, b] : ranges) {
    if (b > end) {
      distinct_bytes += b - std::max(a, end);
      end = b;
    }
    same = a == last ? same + 1 : 1;
    last = a;
    most = std::max(most, same);
  }
  if (q.kind == kAtomic) s.same_address_max = std::max(s.same_address_max, most);
  units.clear();
  if (space == kGlobal) {
    for (const auto& [a, b] : ranges)
      for (uint64_t u = a >> 5; u <= (b - 1) >> 5; ++u) units.push_back(u);
    std::sort(units.begin(), units.end());
    units.erase(std::unique(units.begin(), units.end()), units.end());
    s.sectors += units.size();
    s.ideal_sectors += (distinct_bytes + 31) / 32;
    s.max_sectors = std::max<uint64_t>(s.max_sectors, units.size());
    s.distinct.insert(units.begin(), units.end());
    t.distinct.insert(units.begin(), units.end());
  } else {
    // 32 banks of 4-byte words: lanes on the same word are one broadcast; the degree is the most
    // distinct words any bank serves (1 = no conflict).
    for (const auto& [a, b] : ranges)
      for (uint64_t u = a >> 2; u <= (b - 1) >> 2; ++u) units.push_back(u);
    std::sort(units.begin(), units.end());
    units.erase(std::unique(units.begin(), units.end()), units.end());
    uint32_t per_bank[32] = {0};
    uint64_t degree = 0;
    for (uint64_t u : units) degree = std::max<uint64_t>(degree, ++per_bank[u & 31]);
    s.wavefronts += degree;
    s.ideal_wavefronts += (units.size() + 31) / 32;
    s.max_degree = std::max(s.max_degree, degree);
  }
}

// Warp-level state of trace_block, reused from warp to warp.
struct WarpScratch {
  std::unordered_map<uintptr_t, PcInfo> pcs;
  std::unordered_map<uintptr_t, uint32_t> lane_totals[32];  // executions per instruction and lane
  std::unordered_map<uintptr_t, uint32_t> counts;
  std::unordered_map<uintptr_t, std::vector<Ref>> refs;
  std::unordered_map<RequestKey, uint32_t, RequestKeyHash> since_anchor, index;
  std::vector<RecentAnchor> recent;
  std::vector<Request> requests;
  std::vector<uint64_t> units;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
};

// Moves anchor execution (pc, index) to the end of the lane's recent anchors.
void touch(std::vector<RecentAnchor>& recent, uintptr_t pc, uint32_t mask, uint32_t index, uint32_t request) {
  for (size_t j = 0; j < recent.size(); ++j) {
    if (recent[j].pc == pc) {
      recent.erase(recent.begin() + j);
      break;
    }
  }
  recent.push_back(RecentAnchor{pc, mask, index, request});
}

// The latest anchor execution whose lanes cover `mask`, or null.
const RecentAnchor* covering(const std::vector<RecentAnchor>& recent, uint32_t mask) {
  for (size_t j = recent.size(); j-- > 0;)
    if ((recent[j].mask & mask) == mask) return &recent[j];
  return nullptr;
}

// With the current anchors: do the k-th executions of each anchor (of `subject` only, when not 0)
// follow the same context in every lane? Marks the ones that do not (mismatch); true when none.
bool contexts_agree(const Runtime& r, int w0, int w1, WarpScratch& w, uintptr_t subject) {
  w.refs.clear();
  bool agree = true;
  for (auto& [pc, p] : w.pcs) p.mismatch = false;
  for (int i = w0; i < w1; ++i) {
    w.recent.clear();
    w.counts.clear();
    const auto& totals = w.lane_totals[i - w0];
    for (const Access& a : r.logs[i].log) {
      if (a.space == kParam) continue;
      PcInfo& p = w.pcs[a.pc];
      if (!p.anchor()) continue;
      const uint32_t index = w.counts[a.pc]++;
      if ((subject == 0 || a.pc == subject) && !p.mismatch) {
        Ref ref;
        if (const RecentAnchor* c = covering(w.recent, p.mask))
          ref = Ref{c->pc, c->index, c->index + 1 == totals.at(c->pc), true};
        std::vector<Ref>& refs = w.refs[a.pc];
        if (refs.size() < p.max) refs.resize(p.max);
        if (!refs[index].set) {
          refs[index] = ref;
          refs[index].set = true;
        } else if (!same_context(refs[index], ref)) {
          p.mismatch = true;
          agree = false;
        }
      }
      touch(w.recent, a.pc, p.mask, index, 0);
    }
  }
  return agree;
}

// Candidates whose contexts disagree are no anchors. Which ones: taken in order of first execution,
// each is kept when its contexts agree given the ones kept before it. One pass over the warp per
// candidate, only when the contexts of all candidates together disagree.
void choose_anchors(const Runtime& r, int w0, int w1, WarpScratch& w) {
  if (contexts_agree(r, w0, w1, w, 0)) return;
  std::vector<std::pair<uint32_t, uintptr_t>> order;
  for (auto& [pc, p] : w.pcs) {
    p.demoted = true;
    if (p.candidate()) order.emplace_back(p.first, pc);
  }
  std::sort(order.begin(), order.end());
  for (const auto& [first, x] : order) {
    PcInfo& p = w.pcs[x];
    p.demoted = false;
    p.demoted = !contexts_agree(r, w0, w1, w, x);
  }
}

// After a block ran: its fibers' accesses, grouped warp by warp into requests and accounted per line.
//
// Lanes pair up by the k-th execution of an instruction, but not simply since the kernel's start: a lane
// that skips a conditional access in one iteration of a loop would then pair its later executions with
// other lanes' earlier iterations. So an anchor is an instruction that every lane executing it executes
// equally often (or once more: the last trip of a strided loop), in the same contexts (as the accesses of
// a loop body before any branch do; choose_anchors); the k-th executions of an anchor form one request.
// Any other instruction's executions are counted since the lane's latest anchor execution among anchors
// whose lanes cover the instruction's: a conditional access in a loop thus pairs by iteration, an inner
// loop's trips by outer iteration.
void trace_block() {
  Runtime& r = rt();
  LaunchTrace& t = r.launches.back();
  const int T = r.threads;
  ++t.blocks;
  t.threads += T;
  static WarpScratch w;
  for (int w0 = 0; w0 < T; w0 += 32) {
    const int w1 = std::min(T, w0 + 32);
    // Address spaces, and which lanes execute each instruction how often.
    w.pcs.clear();
    for (int i = w0; i < w1; ++i) {
      FiberLog& l = r.logs[i];
      t.local[0] += l.local[0];
      t.local[1] += l.local[1];
      auto& totals = w.lane_totals[i - w0];
      totals.clear();
      uint32_t position = 0;
      for (Access& a : l.log) {
        if (inside(a.addr, r.static_arena, kMaxStaticShared) || inside(a.addr, r.dynamic_arena, kMaxSharedPerBlock)) {
          a.space = kShared;
        } else if (is_param(r, a.addr)) {
          a.space = kParam;
          ++t.param[a.kind & 1];
          continue;
        } else {
          a.space = kGlobal;
        }
        if (totals[a.pc]++ == 0) {
          PcInfo& p = w.pcs[a.pc];
          p.first = std::min(p.first, position);
        }
        ++position;
      }
      for (const auto& [pc, n] : totals) {
        PcInfo& p = w.pcs[pc];
        p.min = p.mask ? std::min(p.min, n) : n;
        p.max = p.mask ? std::max(p.max, n) : n;
        p.mask |= 1u << (i - w0);
      }
    }
    choose_anchors(r, w0, w1, w);
    // Requests.
    w.index.clear();
    uint32_t used = 0;
    for (int i = w0; i < w1; ++i) {
      w.recent.clear();
      w.since_anchor.clear();
      w.counts.clear();
      for (const Access& a : r.logs[i].log) {
        if (a.space == kParam) continue;
        const PcInfo& p = w.pcs[a.pc];
        const uint32_t execution = w.counts[a.pc]++;
        RequestKey key{a.pc, kAnchor, execution};
        if (!p.anchor()) {
          const RecentAnchor* c = covering(w.recent, p.mask);
          key.parent = c ? c->request : kNoParent;
          key.k = w.since_anchor[RequestKey{a.pc, key.parent, 0}]++;
        }
        const auto [it, fresh] = w.index.try_emplace(key, used);
        if (fresh) {
          if (used == w.requests.size()) w.requests.emplace_back();
          Request& q = w.requests[used++];
          q.pc = a.pc;
          q.kind = a.kind;
          q.lanes.clear();
        }
        w.requests[it->second].lanes.push_back(LaneAccess{a.addr, a.size, a.space});
        if (p.anchor()) touch(w.recent, a.pc, p.mask, execution, it->second);
      }
    }
    for (uint32_t j = 0; j < used; ++j) {
      const Request& q = w.requests[j];
      unsigned spaces = 0;
      for (const LaneAccess& l : q.lanes) spaces |= 1u << l.space;
      for (uint8_t sp = kGlobal; sp <= kShared; ++sp)
        if (spaces & (1u << sp)) account(t, q, sp, w.units, w.ranges);
    }
  }
}

std::string json_string(const std::string& v) {
  std::string o = "\"";
  for (const char ch : v) {
    if (ch == '"' || ch == '\\') {
      o += '\\';
      o += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      snprintf(buf, sizeof buf, "\\u%04x", ch);
      o += buf;
    } else {
      o += ch;
    }
  }
  return o + "\"";
}

// The loaded library holding `pc` and pc's offset in it (for addr2line, in tests/emulator/gpu_trace.py).
void module_offset(std::ostringstream& o, uintptr_t pc) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(pc), &info) && info.dli_fname) {
    o << "\"module\": " << json_string(info.dli_fname) << ", \"offset\": " << pc - reinterpret_cast<uintptr_t>(info.dli_fbase);
  } else {
    o << "\"module\": \"\", \"offset\": " << pc;
  }
}

std::string trace_json(const std::vector<LaunchTrace>& launches) {
  static const char* kinds[] = {"load", "store", "atomic"};
  static const char* spaces[] = {"global", "shared"};
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < launches.size(); ++i) {
    const LaunchTrace& t = launches[i];
    o << (i ? ",\n" : "") << "{\"kernel\": " << json_string(t.name) << ", \"site\": " << json_string(t.site) << ", ";
    o << "\"func\": {";
    module_offset(o, t.func);
    o << "}, \"grid\": [" << t.grid.x << ", " << t.grid.y << ", " << t.grid.z << "], \"block\": [" << t.block.x
      << ", " << t.block.y << ", " << t.block.z << "], \"dynamic_shared\": " << t.dynamic_shared
      << ", \"static_shared\": " << t.static_shared << ", \"blocks\": " << t.blocks << ", \"threads\": " << t.threads
      << ", \"barriers\": " << t.barriers << ", \"warp_collectives\": " << t.warp_collectives
      << ", \"local_loads\": " << t.local[0] << ", \"local_stores\": " << t.local[1]
      << ", \"param_loads\": " << t.param[0] << ", \"param_stores\": " << t.param[1]
      << ", \"distinct_sectors\": " << t.distinct.size() << ", \"barrier_sites\": {";
    bool first = true;
    for (const auto& [site, n] : t.barrier_sites) {
      o << (first ? "" : ", ") << json_string(site) << ": " << n;
      first = false;
    }
    o << "}, \"lines\": [";
    first = true;
    for (const auto& [key, s] : t.lines) {
      o << (first ? "\n" : ",\n") << "  {";
      first = false;
      module_offset(o, key.pc);
      o << ", \"kind\": \"" << kinds[s.kind] << "\", \"space\": \"" << spaces[s.space] << "\", \"requests\": "
        << s.requests << ", \"lanes\": " << s.lanes << ", \"bytes\": " << s.bytes << ", \"sectors\": " << s.sectors
        << ", \"ideal_sectors\": " << s.ideal_sectors << ", \"max_sectors\": " << s.max_sectors
        << ", \"distinct_sectors\": " << s.distinct.size() << ", \"wavefronts\": " << s.wavefronts
        << ", \"ideal_wavefronts\": " << s.ideal_wavefronts << ", \"max_degree\": " << s.max_degree
        << ", \"same_address_max\": " << s.same_address_max << "}";
    }
    o << "]}";
  }
  o << "]";
  return o.str();
}
#endif

}  // namespace

// ---------------------------------------------------------------- API used by the header

void set_schedule(int order, uint64_t seed) {
  TORCH_CHECK(order == kForward || order == kReverse || order == kRandom, "CUDA emulation: unknown order ", order);
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  r.order = order;
  r.seed = seed;
  r.launch_index = 0;
}

std::vector<int64_t> stats() {
  Runtime& r = rt();
  return {r.stats.launches, r.stats.blocks, r.stats.fibers, r.stats.switches, r.order, r.stats.attribute_sets};
}

void fail(const std::string& message) {
  Runtime& r = rt();
  if (r.current) fail_in_fiber(message);
  TORCH_CHECK(false, "CUDA emulation: ", message);
  __builtin_unreachable();
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  KernelInfo& k = r.kernels[func];
  if (value < 0 || static_cast<size_t>(value) + k.static_bytes > kMaxSharedPerBlock) return cudaErrorInvalidValue;
  k.max_dynamic = value;
  ++r.stats.attribute_sets;
  return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* func) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  const KernelInfo& k = r.kernels[func];
  attr->sharedSizeBytes = k.static_bytes;
  attr->maxDynamicSharedSizeBytes = static_cast<int>(dynamic_limit(k));
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

void* static_shared(const void* site, size_t bytes, size_t align) {
  Runtime& r = rt();
  if (!r.current) fail("a __shared__ variable outside a kernel");
  for (const SharedSite& s : r.shared_sites)
    if (s.site == site) return r.static_arena + s.offset;
  const size_t offset = (r.static_used + align - 1) / align * align;
  const size_t end = offset + bytes;
  const size_t dyn = r.config->dynamic_shared;
  KernelInfo& k = *r.kernel;
  if (end > kMaxStaticShared) fail("static shared memory of " + std::to_string(end) + " bytes exceeds 48 KB");
  if (k.max_dynamic < 0 && end + dyn > kDefaultDynamicShared)
    fail("static (" + std::to_string(end) + ") + dynamic (" + std::to_string(dyn) + ") shared memory exceeds 48 KB; " +
         limit_hint());
  if (k.max_dynamic >= 0 && end + static_cast<size_t>(k.max_dynamic) > kMaxSharedPerBlock)
    fail("static shared memory (" + std::to_string(end) + ") + cudaFuncAttributeMaxDynamicSharedMemorySize (" +
         std::to_string(k.max_dynamic) + ") exceeds the device limit of " + std::to_string(kMaxSharedPerBlock) +
         " bytes per block");
  r.static_used = end;
  k.static_bytes = std::max(k.static_bytes, end);
  CM_EMU_UNPOISON(r.static_arena + offset, bytes);
  if (end > r.static_filled) {
    fill_garbage(r.static_arena + offset, end - offset, r.order, r.launch_index ^ end);
    r.static_filled = end;
  }
  r.shared_sites.push_back(SharedSite{site, offset, bytes});
  return r.static_arena + offset;
}

void* dynamic_shared() {
  Runtime& r = rt();
  if (!r.current) fail("extern __shared__ memory outside a kernel");
  return r.dynamic_arena;
}

int syncthreads(const char* file, int line, BarrierOp op, int predicate) {
  Runtime& r = rt();
  if (!r.current) fail("__syncthreads outside a kernel");
  Fiber& f = *r.current;
  const Site site{file, line};
  if (r.exited > 0) {
    fail_in_fiber("__syncthreads (" + where(site) + ") reached by " + thread_name(f) + " after " +
                  thread_name(r.fibers[r.first_exited]) +
                  " exited: every thread of the block must reach each barrier");
  }
  if (r.at_barrier == 0) {
    r.barrier_site = site;
    r.barrier_first = f.linear;
  } else if (!same_site(site, r.barrier_site)) {
    fail_in_fiber("divergent barrier: " + thread_name(r.fibers[r.barrier_first]) + " waits at __syncthreads (" +
                  where(r.barrier_site) + ") while " + thread_name(f) + " reached __syncthreads (" + where(site) +
                  ")");
  }
  f.state = State::kBarrier;
  f.site = site;
  f.op = op;
  f.pred = predicate;
  ++r.at_barrier;
  --r.ready;
  yield();
  return f.result;
}

uint64_t warp_collective(const char* file, int line, WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  Runtime& r = rt();
  if (!r.current) fail(std::string(warp_op_name(op)) + " outside a kernel");
  Fiber& f = *r.current;
  const Site site{file, line};
  const int lane = f.linear % 32;
  Warp& w = r.warps[f.linear / 32];
  auto what = [&] { return std::string(warp_op_name(op)) + " (" + where(site) + ") in " + thread_name(f); };
  if (mask != 0xffffffffu) {
    char hex[16];
    snprintf(hex, sizeof hex, "0x%08x", mask);
    fail_in_fiber(what() + ": partial mask " + hex + "; only full-warp collectives (0xffffffff) are supported");
  }
  if (w.size != 32)
    fail_in_fiber(what() + ": its warp has only " + std::to_string(w.size) + " lanes (block of " +
                  std::to_string(r.threads) + " threads), but the mask names 32");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail_in_fiber(what() + ": width " + std::to_string(width) + " is not a power of two <= 32");
  if (w.exited > 0)
    fail_in_fiber(what() + ": " + std::to_string(w.exited) + " lane(s) of its warp have exited; a warp collective " +
                  "needs every lane of its mask");
  if (w.arrived == 0) {
    w.site = site;
    w.op = op;
    w.first = f.linear;
  } else if (!same_site(site, w.site) || w.op != op) {
    fail_in_fiber("warp divergence: " + thread_name(r.fibers[w.first]) + " waits at " + warp_op_name(w.op) + " (" +
                  where(w.site) + ") while " + warp_op_name(op) + " (" + where(site) + ") was reached by " +
                  thread_name(f));
  }
  f.state = State::kWarp;
  f.site = site;
  f.op = op;
  f.value = value;
  f.arg = arg;
  f.width = width;
  --r.ready;
  if (++w.arrived == w.size) {
    Fiber* lanes = &r.fibers[f.linear - lane];
    uint64_t ballot = 0;
    for (int l = 0; l < 32; ++l) ballot |= (lanes[l].value & 1) << l;
    for (int l = 0; l < 32; ++l) {
      Fiber& g = lanes[l];
      const int seg = l & ~(g.width - 1);
      int src = l;
      switch (g.op) {
        case kShflIdx: src = seg + (g.arg & (g.width - 1)); break;
        case kShflUp: src = l - g.arg >= seg ? l - g.arg : l; break;
        case kShflDown: src = l + g.arg < seg + g.width ? l + g.arg : l; break;
        case kShflXor: src = (l ^ g.arg) < seg + g.width && (l ^ g.arg) >= 0 ? (l ^ g.arg) : l; break;
        default: break;
      }
      g.out = g.op == kBallot ? ballot : lanes[src].value;
      g.state = State::kReady;
    }
    r.ready += 32;
    w.arrived = 0;
    w.first = -1;
#if CM_EMU_TRACE
    if (r.tracing) ++r.launches.back().warp_collectives;
#endif
  }
  yield();
  return f.out;
}

void run_launch(const LaunchConfig& c, void (*body)(void*), void* context, size_t context_bytes) {
  Runtime& r = rt();
  TORCH_CHECK(!r.current, "CUDA emulation: kernel launch from inside a kernel (", c.name, ")");
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  const dim3 g = c.grid, b = c.block;
  if (g.x == 0 || g.y == 0 || g.z == 0) launch_error(c, "empty grid");
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    launch_error(c, "grid too large (at most 2^31-1 x 65535 x 65535)");
  if (b.x == 0 || b.y == 0 || b.z == 0) launch_error(c, "empty block");
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || uint64_t(b.x) * b.y * b.z > 1024)
    launch_error(c, "block too large (at most 1024 threads, z <= 64)");
  KernelInfo& k = r.kernels[c.func];
  if (c.dynamic_shared > kMaxSharedPerBlock)
    launch_error(c, "dynamic shared memory over the device limit of " + std::to_string(kMaxSharedPerBlock) + " bytes");
  if (c.dynamic_shared > dynamic_limit(k))
    launch_error(c, "dynamic shared memory over the kernel's limit of " + std::to_string(dynamic_limit(k)) +
                        " bytes; " + limit_hint());

  const int T = static_cast<int>(b.x * b.y * b.z);
  if (r.fibers.size() < static_cast<size_t>(T)) r.fibers.resize(T);
  while (r.stacks.size() < static_cast<size_t>(T)) r.stacks.push_back(new_stack());
  for (int i = 0; i < T; ++i) r.fibers[i].stack = r.stacks[i];
  r.warps.assign((T + 31) / 32, Warp());
  r.threads = T;
  r.config = &c;
  r.kernel = &k;
  r.body = body;
  r.context = context;
  r.context_bytes = context_bytes;
  r.failed = false;
  r.error.clear();
#if CM_EMU_ASM_SWITCH
  uint32_t mxcsr = 0;
  uint16_t fcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  r.fp_control = uint64_t(mxcsr) | (uint64_t(fcw) << 32);
#endif
  gridDim = g;
  blockDim = b;
  ++r.stats.launches;
#if CM_EMU_TRACE
  if (r.tracing) {
    r.launches.emplace_back();
    LaunchTrace& t = r.launches.back();
    t.name = c.name;
    t.site = where(Site{c.file, c.line});
    t.grid = g;
    t.block = b;
    t.dynamic_shared = c.dynamic_shared;
    t.func = reinterpret_cast<uintptr_t>(c.func);
  }
#endif
  const uint64_t launch_seed = splitmix64(r.seed ^ splitmix64(++r.launch_index));
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(splitmix64(launch_seed ^ (uint64_t(z) << 48 | uint64_t(y) << 32 | x)));
#if CM_EMU_TRACE
        if (r.tracing && !r.failed) trace_block();
        if (r.tracing && r.failed) r.launches.pop_back();  // a failed launch leaves no record
#endif
        if (r.failed) {
          r.config = nullptr;
          for (int i = 0; i < T; ++i) CM_EMU_UNPOISON(r.stacks[i], kStackSize);
          TORCH_CHECK(false, "CUDA emulation: kernel ", c.name, " (launched at ", where(Site{c.file, c.line}),
                      "), block (", x, ",", y, ",", z, ") of grid ", dim_string(g), ", block ", dim_string(b), ": ",
                      r.error);
        }
      }
#if CM_EMU_TRACE
  if (r.tracing) r.launches.back().static_shared = k.static_bytes;
#endif
  r.config = nullptr;
}

#if CM_EMU_TRACE
void trace_atomic_begin(const void* p, size_t bytes) {
  record(p, bytes, kAtomic, __builtin_return_address(0));
  if (tl_log) ++tl_log->suppress;
}

void trace_atomic_end() {
  if (tl_log) --tl_log->suppress;
}

void trace_begin() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  r.launches.clear();
  r.tracing = true;
}

std::string trace_end() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  r.tracing = false;
  std::string out = trace_json(r.launches);
  r.launches.clear();
  return out;
}
#endif

// ---------------------------------------------------------------- garbage-filled allocations

namespace {

thread_local int garbage_depth = 0;

struct GarbageAllocator final : c10::Allocator {
  c10::Allocator* inner;
  explicit GarbageAllocator(c10::Allocator* a) : inner(a) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner->allocate(n);
    if (garbage_depth > 0 && n > 0 && p.get()) {
      Runtime& r = rt();
      fill_garbage(p.get(), n, r.order, splitmix64(r.seed ^ reinterpret_cast<uintptr_t>(p.get()) ^ n));
    }
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner->copy_data(dest, src, count);
  }
};

void install_garbage_allocator() {
  static std::once_flag once;
  std::call_once(once, [] {
    static GarbageAllocator allocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(&allocator, /*priority=*/100);
  });
}

}  // namespace

GarbageAllocations::GarbageAllocations() {
  install_garbage_allocator();
  ++garbage_depth;
}
GarbageAllocations::~GarbageAllocations() { --garbage_depth; }

}  // namespace emu
}  // namespace contrastmask

#if CM_EMU_TRACE
// The hooks of -fsanitize=kernel-address (with asan-instrumentation-with-call-threshold=0): every load
// and store of an instrumented translation unit calls one, before the access, with its address. No
// AddressSanitizer runtime is linked; these only record, and only while a kernel thread runs.
#define CM_EMU_TRACE_HOOKS(n)                                                                     \
  extern "C" void __asan_load##n##_noabort(void* p) {                                             \
    contrastmask::emu::record(p, n, contrastmask::emu::kLoad, __builtin_return_address(0));       \
  }                                                                                               \
  extern "C" void __asan_store##n##_noabort(void* p) {                                            \
    contrastmask::emu::record(p, n, contrastmask::emu::kStore, __builtin_return_address(0));      \
  }
CM_EMU_TRACE_HOOKS(1)
CM_EMU_TRACE_HOOKS(2)
CM_EMU_TRACE_HOOKS(4)
CM_EMU_TRACE_HOOKS(8)
CM_EMU_TRACE_HOOKS(16)
extern "C" void __asan_loadN_noabort(void* p, size_t n) {
  contrastmask::emu::record(p, n, contrastmask::emu::kLoad, __builtin_return_address(0));
}
extern "C" void __asan_storeN_noabort(void* p, size_t n) {
  contrastmask::emu::record(p, n, contrastmask::emu::kStore, __builtin_return_address(0));
}
// The rest of what the instrumented code calls: nothing to do without shadow memory.
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}
#endif
