// The emulated GPU's runtime: blocks run one at a time, their threads as
// ucontext fibers (see cuda_emulation.h for the model and the checks).
#include "cuda_emulation.h"

#include <ucontext.h>

#include <algorithm>
#include <map>
#include <sstream>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FUSED_BN_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUSED_BN_EMULATION_ASAN 1
#endif
#endif
#if defined(FUSED_BN_EMULATION_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

namespace fused_bn {
namespace emulation {
namespace {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 0x7fffffffu;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;  // without cudaFuncSetAttribute's opt-in
#if defined(FUSED_BN_EMULATION_ASAN)
// ASan's swapcontext interceptor clears the shadow of the whole stack switched
// to, on every switch: a small stack keeps that a memset (1 MB made it madvise,
// and the ASan pass 6x slower). The kernels' frames need a few KB.
constexpr size_t kStackBytes = 64 << 10;
#else
constexpr size_t kStackBytes = 256 << 10;
#endif

enum class State { kRunnable, kAtBarrier, kAtShuffle, kExited };

struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  bool operator!=(const Site& o) const { return !(*this == o); }
};

struct ShuffleCall {
  ShuffleKind kind = ShuffleKind::kIndex;
  unsigned mask = 0;
  uint64_t value = 0;
  int lane_argument = 0;
  int width = 32;
  uint64_t result = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;  // uninitialized: pages are touched only as used
  void* fake_stack = nullptr;  // ASan's, while switched away
  State state = State::kRunnable;
  Site site;
  ShuffleCall shuffle;
  uint3 index;
  // Traffic accounting: synchronisation points passed (barriers, shuffles),
  // and the accesses made at each source site since the last one.
  uint32_t epoch = 0;
  std::vector<std::pair<std::pair<const char*, int>, uint32_t>> site_counts;
};

// One lane's global access, as recorded while traffic recording is on.
struct Access {
  uint32_t warp, epoch, instance;
  const char* file;
  int line;
  bool store;
  bool element;
  uint64_t address;
  uint32_t bytes;
};

// Disjoint address ranges [begin, end) touched by a launch, with the bytes
// asked for inside each, counted once per warp request (overlapping or
// adjacent ranges merge).
struct Segment {
  uint64_t end = 0;
  uint64_t asked = 0;
};
using Segments = std::map<uint64_t, Segment>;

void add_range(Segments& segments, uint64_t begin, uint64_t end, uint64_t asked) {
  auto it = segments.upper_bound(begin);
  if (it != segments.begin() && std::prev(it)->second.end >= begin) it = std::prev(it);
  while (it != segments.end() && it->first <= end) {
    begin = std::min(begin, it->first);
    end = std::max(end, it->second.end);
    asked += it->second.asked;
    it = segments.erase(it);
  }
  segments.emplace(begin, Segment{end, asked});
}

// Warp requests of one source site (file:line, load or store) in a launch.
struct SiteTraffic {
  // bytes: what the lanes asked for; unique_bytes: of those, the distinct
  // bytes of each request (a broadcast of one value to 32 lanes is 4 bytes).
  uint64_t requests = 0, sectors = 0, lines = 0, bytes = 0, unique_bytes = 0, accesses = 0;
};

// One launch's traffic.
struct LaunchTraffic {
  std::string kernel;
  dim3 grid, block;
  bool failed = false;
  uint64_t blocks_run = 0;
  // [load, store]
  uint64_t requests[2] = {0, 0}, sectors[2] = {0, 0}, lines[2] = {0, 0}, bytes[2] = {0, 0}, unique_bytes[2] = {0, 0};
  Segments ranges[2];
  std::map<std::tuple<std::string, int, bool, bool>, SiteTraffic> sites;  // file, line, store, element
};

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable: return "running";
    case State::kAtBarrier: return "at a barrier";
    case State::kAtShuffle: return "at a shuffle";
    case State::kExited: return "exited";
  }
  return "?";
}

std::string where(const Site& s) { return std::string(s.file) + ":" + std::to_string(s.line); }

std::string thread_name(const uint3& t) {
  return "(" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
}

// Everything of the launch in flight. Launches are serialized (one emulated
// device, one stream), so plain globals suffice.
struct Machine {
  std::mutex launch_mutex;
  DeviceConfig config;
  int64_t launches = 0;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;

  // The launch in flight.
  KernelBody body = nullptr;
  const void* closure = nullptr;
  dim3 grid, block;
  uint3 block_index;
  std::vector<Fiber> fibers;
  unsigned threads = 0;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  std::string failure;  // set by the first check that fails; ends the launch

  // Traffic accounting (while traffic_recording): the block in flight's
  // accesses, the launch in flight's totals, and the launches recorded.
  std::vector<Access> block_accesses;
  LaunchTraffic traffic;
  std::vector<LaunchTraffic> recorded;
  uint64_t every_kth_block = 1;
};

Machine& machine() {
  static Machine m;
  return m;
}

void switch_to_fiber(Machine& m, Fiber& f) {
  m.current = &f;
#if defined(FUSED_BN_EMULATION_ASAN)
  __sanitizer_start_switch_fiber(&m.scheduler_fake_stack, f.stack.get(), kStackBytes);
#endif
  swapcontext(&m.scheduler, &f.context);
#if defined(FUSED_BN_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(m.scheduler_fake_stack, nullptr, nullptr);
#endif
  m.current = nullptr;
}

// From a fiber back to the scheduler; returns when the fiber is resumed.
void switch_to_scheduler(Machine& m, Fiber& f) {
#if defined(FUSED_BN_EMULATION_ASAN)
  __sanitizer_start_switch_fiber(f.state == State::kExited ? nullptr : &f.fake_stack, m.scheduler_stack_bottom,
                                 m.scheduler_stack_size);
#endif
  swapcontext(&f.context, &m.scheduler);
#if defined(FUSED_BN_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &m.scheduler_stack_bottom, &m.scheduler_stack_size);
#endif
}

void fiber_main() {
  Machine& m = machine();
#if defined(FUSED_BN_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &m.scheduler_stack_bottom, &m.scheduler_stack_size);
#endif
  Fiber& f = *m.current;
  m.body(m.closure);
  f.state = State::kExited;
  switch_to_scheduler(m, f);
  std::abort();  // an exited fiber is never resumed
}

void fail(Machine& m, const std::string& what) {
  if (m.failure.empty()) m.failure = what;
}

// A check inside a thread failed: the block is abandoned at once (its fibers
// are never resumed; their stacks are reset by the next block).
[[noreturn]] void fail_in_thread(Machine& m, Fiber& f, const std::string& what) {
  fail(m, what);
  f.state = State::kExited;
  switch_to_scheduler(m, f);
  std::abort();
}

std::vector<unsigned> permutation(unsigned n, BlockOrder order, uint64_t seed, uint64_t stream) {
  std::vector<unsigned> p(n);
  std::iota(p.begin(), p.end(), 0u);
  if (order == BlockOrder::kReverse) {
    std::reverse(p.begin(), p.end());
  } else if (order == BlockOrder::kShuffle) {
    std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + stream);
    std::shuffle(p.begin(), p.end(), rng);
  }
  return p;
}

unsigned warp_lanes(const Machine& m, unsigned warp) {
  return std::min(kWarpSize, m.threads - warp * kWarpSize);
}

// The lane a shuffle reads, or -1 for "keep your own value".
int source_lane(const ShuffleCall& c, int lane) {
  const int width = c.width;
  const int segment = lane / width * width;
  switch (c.kind) {
    case ShuffleKind::kIndex: return segment + ((c.lane_argument % width) + width) % width;
    case ShuffleKind::kUp: return lane % width >= c.lane_argument ? lane - c.lane_argument : -1;
    case ShuffleKind::kDown: return lane % width + c.lane_argument < width ? lane + c.lane_argument : -1;
    case ShuffleKind::kXor: {
      const int other = lane ^ c.lane_argument;
      return other / width * width == segment ? other : -1;
    }
  }
  return -1;
}

// Completes every warp's shuffle whose lanes have all arrived; a shuffle that
// cannot complete (a named lane exited, waits elsewhere or does not exist)
// fails the launch. Returns whether any completed.
bool complete_shuffles(Machine& m) {
  bool progress = false;
  const unsigned warps = (m.threads + kWarpSize - 1) / kWarpSize;
  for (unsigned w = 0; w < warps && m.failure.empty(); ++w) {
    const unsigned lanes = warp_lanes(m, w);
    Fiber* first = nullptr;
    for (unsigned l = 0; l < lanes; ++l) {
      Fiber& f = m.fibers[w * kWarpSize + l];
      if (f.state == State::kAtShuffle) {
        first = &f;
        break;
      }
    }
    if (first == nullptr) continue;
    const unsigned mask = first->shuffle.mask;
    const Site site = first->site;
    for (unsigned l = 0; l < kWarpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (l >= lanes) {
        fail(m, "__shfl_*_sync at " + where(site) + " names lane " + std::to_string(l) + " of warp " +
                    std::to_string(w) + ", which has only " + std::to_string(lanes) +
                    " threads (a full-mask shuffle in a partial warp)");
        return false;
      }
      const Fiber& f = m.fibers[w * kWarpSize + l];
      if (f.state != State::kAtShuffle || f.site != site || f.shuffle.mask != mask ||
          f.shuffle.kind != first->shuffle.kind) {
        fail(m, "__shfl_*_sync at " + where(site) + " (mask 0x" + [&] {
          char b[16];
          std::snprintf(b, sizeof b, "%08x", mask);
          return std::string(b);
        }() + ") is not reached by lane " + std::to_string(l) + " of warp " + std::to_string(w) + ": thread " +
                    thread_name(f.index) + " is " + state_name(f.state) +
                    (f.state == State::kExited ? "" : " at " + where(f.site)));
        return false;
      }
    }
    for (unsigned l = 0; l < lanes; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& f = m.fibers[w * kWarpSize + l];
      const int src = source_lane(f.shuffle, static_cast<int>(l));
      if (src < 0) {
        f.shuffle.result = f.shuffle.value;
      } else if (!(mask >> src & 1u) || static_cast<unsigned>(src) >= lanes) {
        fail(m, "__shfl_*_sync at " + where(site) + ": lane " + std::to_string(l) + " reads lane " +
                    std::to_string(src) + ", which is not in the mask");
        return false;
      } else {
        f.shuffle.result = m.fibers[w * kWarpSize + src].shuffle.value;
      }
    }
    for (unsigned l = 0; l < lanes; ++l) {
      if (mask >> l & 1u) m.fibers[w * kWarpSize + l].state = State::kRunnable;
    }
    progress = true;
  }
  return progress;
}

// All live threads are blocked and no shuffle can complete: every thread of
// the block must be waiting at one and the same barrier.
bool release_barrier(Machine& m) {
  const Fiber* waiting = nullptr;
  for (const Fiber& f : m.fibers) {
    if (f.state == State::kAtBarrier) {
      waiting = &f;
      break;
    }
  }
  if (waiting == nullptr) return false;
  for (unsigned t = 0; t < m.threads; ++t) {
    const Fiber& f = m.fibers[t];
    if (f.state == State::kExited) {
      fail(m, "__syncthreads at " + where(waiting->site) + " is not reached by every thread: thread " +
                  thread_name(f.index) + " exited before it");
      return false;
    }
    if (f.state != State::kAtBarrier || f.site != waiting->site) {
      fail(m, "threads wait at different barriers: thread " + thread_name(waiting->index) + " at " +
                  where(waiting->site) + ", thread " + thread_name(f.index) + " " + state_name(f.state) + " at " +
                  where(f.site));
      return false;
    }
  }
  for (unsigned t = 0; t < m.threads; ++t) m.fibers[t].state = State::kRunnable;
  return true;
}

void run_block(Machine& m, uint64_t block_linear) {
  for (unsigned t = 0; t < m.threads; ++t) {
    Fiber& f = m.fibers[t];
    f.state = State::kRunnable;
    f.fake_stack = nullptr;
    f.epoch = 0;
    f.site_counts.clear();
    f.index = uint3{t % m.block.x, t / m.block.x % m.block.y, t / (m.block.x * m.block.y)};
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  for (uint64_t round = 0;; ++round) {
    const std::vector<unsigned> order =
        permutation(m.threads, m.config.order, m.config.seed, block_linear * 1000003ull + round);
    for (unsigned t : order) {
      if (m.fibers[t].state == State::kRunnable) switch_to_fiber(m, m.fibers[t]);
      if (!m.failure.empty()) return;
    }
    bool all_exited = true;
    for (unsigned t = 0; t < m.threads; ++t) all_exited = all_exited && m.fibers[t].state == State::kExited;
    if (all_exited) return;
    if (complete_shuffles(m)) continue;
    if (!m.failure.empty() || !release_barrier(m)) {
      if (m.failure.empty()) fail(m, "threads blocked with nothing to wait for (emulator fault)");
      return;
    }
  }
}

// Groups the finished block's accesses into warp requests (same warp,
// synchronisation epoch, source site, instance of that site and direction)
// and adds them to the launch's totals.
void account_block(Machine& m) {
  std::vector<Access>& a = m.block_accesses;
  std::sort(a.begin(), a.end(), [](const Access& x, const Access& y) {
    return std::tie(x.warp, x.epoch, x.line, x.file, x.store, x.instance, x.address) <
           std::tie(y.warp, y.epoch, y.line, y.file, y.store, y.instance, y.address);
  });
  std::vector<uint64_t> sectors, lines;
  LaunchTraffic& lt = m.traffic;
  for (size_t i = 0; i < a.size();) {
    size_t j = i;
    sectors.clear();
    lines.clear();
    uint64_t bytes = 0, unique_bytes = 0, covered_to = 0;
    for (; j < a.size() && a[j].warp == a[i].warp && a[j].epoch == a[i].epoch && a[j].line == a[i].line &&
           a[j].file == a[i].file && a[j].store == a[i].store && a[j].instance == a[i].instance;
         ++j) {
      const uint64_t first = a[j].address, last = a[j].address + a[j].bytes - 1;
      for (uint64_t s = first >> 5; s <= last >> 5; ++s) sectors.push_back(s);
      for (uint64_t l = first >> 7; l <= last >> 7; ++l) lines.push_back(l);
      bytes += a[j].bytes;
      // sorted by address within the request: count each byte once
      const uint64_t from = std::max(first, covered_to);
      const uint64_t fresh = last + 1 > from ? last + 1 - from : 0;
      unique_bytes += fresh;
      covered_to = std::max(covered_to, last + 1);
      add_range(lt.ranges[a[j].store ? 1 : 0], first, last + 1, fresh);
    }
    std::sort(sectors.begin(), sectors.end());
    std::sort(lines.begin(), lines.end());
    const uint64_t n_sectors = std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    const uint64_t n_lines = std::unique(lines.begin(), lines.end()) - lines.begin();
    const int d = a[i].store ? 1 : 0;
    lt.requests[d] += 1;
    lt.sectors[d] += n_sectors;
    lt.lines[d] += n_lines;
    lt.bytes[d] += bytes;
    lt.unique_bytes[d] += unique_bytes;
    std::string file = a[i].file;
    const size_t slash = file.rfind('/');
    if (slash != std::string::npos) file = file.substr(slash + 1);
    SiteTraffic& site = lt.sites[{file, a[i].line, a[i].store, a[i].element}];
    site.requests += 1;
    site.sectors += n_sectors;
    site.lines += n_lines;
    site.bytes += bytes;
    site.unique_bytes += unique_bytes;
    site.accesses += j - i;
    i = j;
  }
  a.clear();
}

std::string json_string(const std::string& s) {
  std::string r = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') r += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) r += c;
  }
  return r + "\"";
}

Fiber& current_fiber(const char* what) {
  Machine& m = machine();
  if (m.current == nullptr) {
    std::fprintf(stderr, "fused_bn emulation: %s called outside a kernel\n", what);
    std::abort();
  }
  return *m.current;
}

std::string dims(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

}  // namespace

void set_config(const DeviceConfig& c) {
  Machine& m = machine();
  std::lock_guard<std::mutex> lock(m.launch_mutex);
  m.config = c;
}

DeviceConfig config() {
  Machine& m = machine();
  std::lock_guard<std::mutex> lock(m.launch_mutex);
  return m.config;
}

int64_t launch_count() {
  Machine& m = machine();
  std::lock_guard<std::mutex> lock(m.launch_mutex);
  return m.launches;
}

const uint3& thread_index() { return current_fiber("threadIdx").index; }
const uint3& block_index() { return machine().block_index; }
const dim3& block_dim() { return machine().block; }
const dim3& grid_dim() { return machine().grid; }

void sync_threads(const char* file, int line) {
  Machine& m = machine();
  Fiber& f = current_fiber("__syncthreads");
  ++f.epoch;
  f.site_counts.clear();
  f.state = State::kAtBarrier;
  f.site = Site{file, line};
  switch_to_scheduler(m, f);
}

uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int lane_argument, int width, const char* file,
                 int line) {
  Machine& m = machine();
  Fiber& f = current_fiber("__shfl_*_sync");
  const unsigned t = static_cast<unsigned>(&f - m.fibers.data());
  const Site site{file, line};
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail_in_thread(m, f, "__shfl_*_sync at " + where(site) + ": width " + std::to_string(width) +
                             " is not a power of two up to 32");
  }
  if (!(mask >> (t % kWarpSize) & 1u)) {
    fail_in_thread(m, f, "__shfl_*_sync at " + where(site) + ": thread " + thread_name(f.index) +
                             " calls it with a mask that does not name its own lane");
  }
  ++f.epoch;
  f.site_counts.clear();
  f.state = State::kAtShuffle;
  f.site = site;
  f.shuffle = ShuffleCall{kind, mask, value, lane_argument, width, 0};
  switch_to_scheduler(m, f);
  return f.shuffle.result;
}

void record_global_access(const void* address, unsigned bytes, bool store, bool element, const char* file,
                          int line) {
  Machine& m = machine();
  if (m.current == nullptr) return;  // host code (the accounting covers kernels)
  Fiber& f = *m.current;
  const unsigned t = static_cast<unsigned>(&f - m.fibers.data());
  uint32_t instance = 0;
  bool found = false;
  for (auto& [site, count] : f.site_counts) {
    if (site.first == file && site.second == line) {
      instance = count++;
      found = true;
      break;
    }
  }
  if (!found) f.site_counts.push_back({{file, line}, 1});
  // One counter per site and direction: a site is one direction (its
  // helper's), so the site alone keys it.
  m.block_accesses.push_back(Access{t / kWarpSize, f.epoch, instance, file, line, store, element,
                                    reinterpret_cast<uint64_t>(address), bytes});
}

void set_traffic_recording(bool on, int64_t every_kth_block) {
  Machine& m = machine();
  std::lock_guard<std::mutex> lock(m.launch_mutex);
  m.recorded.clear();
  m.every_kth_block = every_kth_block > 1 ? static_cast<uint64_t>(every_kth_block) : 1;
  traffic_recording = on;
}

std::string take_traffic_json() {
  Machine& m = machine();
  std::lock_guard<std::mutex> lock(m.launch_mutex);
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < m.recorded.size(); ++i) {
    const LaunchTraffic& lt = m.recorded[i];
    if (i) o << ",";
    o << "{\"kernel\":" << json_string(lt.kernel) << ",\"grid\":[" << lt.grid.x << "," << lt.grid.y << ","
      << lt.grid.z << "],\"block\":[" << lt.block.x << "," << lt.block.y << "," << lt.block.z
      << "],\"failed\":" << (lt.failed ? "true" : "false")
      << ",\"blocks_run\":" << lt.blocks_run;
    for (int d = 0; d < 2; ++d) {
      o << ",\"" << (d ? "store" : "load") << "\":{\"requests\":" << lt.requests[d]
        << ",\"sectors\":" << lt.sectors[d] << ",\"lines\":" << lt.lines[d] << ",\"bytes\":" << lt.bytes[d]
        << ",\"unique_bytes\":" << lt.unique_bytes[d]
        << ",\"ranges\":[";
      bool first = true;
      for (const auto& [begin, seg] : lt.ranges[d]) {
        o << (first ? "" : ",") << "[" << begin << "," << seg.end << "," << seg.asked << "]";
        first = false;
      }
      o << "]}";
    }
    o << ",\"sites\":[";
    bool first = true;
    for (const auto& [key, s] : lt.sites) {
      o << (first ? "" : ",") << "{\"site\":" << json_string(std::get<0>(key) + ":" + std::to_string(std::get<1>(key)))
        << ",\"store\":" << (std::get<2>(key) ? "true" : "false")
        << ",\"element\":" << (std::get<3>(key) ? "true" : "false") << ",\"requests\":" << s.requests
        << ",\"sectors\":" << s.sectors << ",\"lines\":" << s.lines << ",\"bytes\":" << s.bytes << ",\"unique_bytes\":" << s.unique_bytes
        << ",\"accesses\":" << s.accesses << "}";
      first = false;
    }
    o << "]}";
  }
  o << "]";
  m.recorded.clear();
  return o.str();
}

float rcp_approx_ftz(float x) { return 1.0f / x; }
double rcp_approx_ftz(double x) { return static_cast<double>(1.0f / static_cast<float>(x)); }

cudaError_t launch(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                   unsigned max_threads_per_block, KernelBody body, const void* closure) {
  Machine& m = machine();
  std::lock_guard<std::mutex> lock(m.launch_mutex);
  ++m.launches;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const unsigned bound = std::min(max_threads_per_block, kMaxThreadsPerBlock);
  std::string invalid;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    invalid = "an empty grid " + dims(grid) + " or block " + dims(block);
  } else if (grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) {
    invalid = "grid " + dims(grid) + " over the limits (2^31 - 1, 65535, 65535)";
  } else if (threads > bound) {
    invalid = "block " + dims(block) + " of " + std::to_string(threads) + " threads over the limit of " +
              std::to_string(bound) + (bound < kMaxThreadsPerBlock ? " (__launch_bounds__)" : "");
  } else if (dynamic_shared_bytes > kMaxDynamicSharedBytes) {
    invalid = std::to_string(dynamic_shared_bytes) + " bytes of dynamic shared memory over the 48 KB limit";
  }
  if (!invalid.empty()) {
    m.last_error = cudaErrorInvalidConfiguration;
    m.last_message = std::string(kernel_name) + ": " + invalid;
    return m.last_error;
  }

  m.body = body;
  m.closure = closure;
  m.grid = grid;
  m.block = block;
  m.threads = static_cast<unsigned>(threads);
  if (m.fibers.size() < m.threads) m.fibers.resize(m.threads);
  m.failure.clear();
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t{0});
  if (m.config.order == BlockOrder::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (m.config.order == BlockOrder::kShuffle) {
    std::mt19937_64 rng(m.config.seed);
    std::shuffle(order.begin(), order.end(), rng);
  }
  const bool tracing = traffic_recording;
  if (tracing) {
    m.traffic = LaunchTraffic{};
    m.traffic.kernel = kernel_name;
    m.traffic.grid = grid;
    m.traffic.block = block;
    m.block_accesses.clear();
  }
  for (uint64_t b : order) {
    if (tracing && m.every_kth_block > 1 && b % m.every_kth_block != 0) continue;
    m.block_index = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                          static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    run_block(m, b);
    if (tracing) {
      account_block(m);
      ++m.traffic.blocks_run;
    }
    if (!m.failure.empty()) {
      if (tracing) {
        m.traffic.failed = true;
        m.recorded.push_back(std::move(m.traffic));
      }
      m.last_error = cudaErrorLaunchFailure;
      m.last_message = std::string(kernel_name) + ", block " + thread_name(m.block_index) + " of grid " +
                       dims(grid) + ", block size " + dims(block) + ": " + m.failure;
      return m.last_error;
    }
  }
  if (tracing) m.recorded.push_back(std::move(m.traffic));
  return cudaSuccess;
}

const char* error_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError";
  }
}

const char* last_error_message() { return machine().last_message.c_str(); }

cudaError_t get_last_error() {
  Machine& m = machine();
  const cudaError_t e = m.last_error;
  m.last_error = cudaSuccess;
  return e;
}

}  // namespace emulation
}  // namespace fused_bn
