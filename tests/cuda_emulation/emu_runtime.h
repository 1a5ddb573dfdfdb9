// The runtime half of the CUDA emulation (emu.h): error codes, streams, the
// built-in index variables, the block barrier and the kernel launcher.
#pragma once

// The toolkit's declarations: dim3, uint3, cudaError_t, cudaStream_t, and the
// runtime functions, of which the few the kernels call are defined below.
#include <cuda_runtime_api.h>
#include <math.h>  // nvcc makes expf, logf, ... visible without an include

#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

// math_constants.h spells infinities with these device intrinsics.
inline float __int_as_float(unsigned bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline double __longlong_as_double(unsigned long long bits) {
  double f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The built-in variables, set by the launcher in each emulated thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace mmk_emu {

// Per host thread, like the runtime's sticky-until-read launch error.
inline thread_local cudaError_t last_error = cudaSuccess;

// Seconds a barrier waits before it reports a deadlock (MMK_EMU_TIMEOUT_S).
inline double barrier_timeout_s() {
  const char* env = std::getenv("MMK_EMU_TIMEOUT_S");
  return env != nullptr ? std::atof(env) : 60.0;
}

struct Block;
inline thread_local Block* current_block = nullptr;

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// A barrier for `count` threads that also checks what the hardware leaves
// undefined: every thread of a generation must arrive from the same call
// site (source line), and no thread may wait while another has returned.
class Barrier {
 public:
  Barrier(const char* what, int count) : what_(what), count_(count) {}

  void arrive_and_wait(int line) {
    std::unique_lock<std::mutex> lock(mu_);
    if (exited_ > 0)
      fail("%s at line %d after %d thread(s) of the group returned: they never arrive", what_, line, exited_);
    if (arrived_ == 0) {
      line_ = line;
    } else if (line != line_) {
      fail("threads of one group wait at different %s calls (lines %d and %d)", what_, line_, line);
    }
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const auto timeout = std::chrono::duration<double>(barrier_timeout_s());
    if (!cv_.wait_for(lock, timeout, [&] { return generation_ != generation; }))
      fail("deadlock: %d of %d threads waited %.0f s at %s (line %d)", arrived_, count_, timeout.count(), what_,
           line_);
  }

  // A thread returned from the kernel.
  void exit() {
    std::lock_guard<std::mutex> lock(mu_);
    if (arrived_ > 0)
      fail("a thread returned while %d other(s) wait at %s (line %d)", arrived_, what_, line_);
    ++exited_;
  }

 private:
  const char* what_;
  const int count_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0, exited_ = 0, line_ = 0;
  uint64_t generation_ = 0;
};

// What the threads of the running block share.
struct Block {
  const char* kernel;
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warps;  // for the warp-collective *_sync calls

  Block(const char* name, int threads) : kernel(name), barrier("__syncthreads()", threads) {
    for (int first = 0; first < threads; first += 32) {
      const int lanes = threads - first < 32 ? threads - first : 32;
      warps.push_back(std::make_unique<Barrier>("a warp-collective wmma call", lanes));
    }
  }
};

inline void fail(const char* fmt, ...) {
  char message[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(message, sizeof message, fmt, args);
  va_end(args);
  if (current_block != nullptr) {
    std::fprintf(stderr, "mmk_emu: kernel %s, block (%u, %u, %u), thread (%u, %u, %u): %s\n", current_block->kernel,
                 blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, message);
  } else {
    std::fprintf(stderr, "mmk_emu: %s\n", message);
  }
  std::fflush(stderr);
  std::abort();
}

inline unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// The warp-collective calls synchronize their warp (and check that all of it calls).
inline void warp_sync(int line) {
  if (current_block == nullptr) fail("a warp-collective call outside a kernel (line %d)", line);
  current_block->warps[linear_thread() / 32]->arrive_and_wait(line);
}

inline unsigned lane_id() { return linear_thread() % 32; }

// The launch limits of compute capability 8.x and 9.x; false (with the reason
// on stderr, and cudaErrorInvalidConfiguration) where the hardware refuses.
inline bool launch_config_ok(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem) {
  const char* why = nullptr;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) why = "an empty grid or block";
  else if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) why = "more than 1024 threads a block (or x, y > 1024, z > 64)";
  else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) why = "grid y or z above 65535 (or x above 2^31 - 1)";
  // Dynamic shared memory needs an extern __shared__ array, which the kernels
  // do not declare (and the emulation does not provide).
  else if (dynamic_smem != 0) why = "dynamic shared memory requested, none declared";
  if (why == nullptr) return true;
  std::fprintf(stderr, "mmk_emu: launch of %s <<<(%u, %u, %u), (%u, %u, %u), %zu>>> refused: %s\n", kernel, grid.x,
               grid.y, grid.z, block.x, block.y, block.z, dynamic_smem, why);
  return false;
}

// Worker threads kept for the whole process: a block's threads are the first
// blockDim of them, so that no thread is created per block (thread creation
// dominates the sanitizer runs otherwise).
class ThreadPool {
 public:
  static ThreadPool& get() {
    static ThreadPool pool;
    return pool;
  }

  // Runs body(t) for t in [0, threads), each on its own thread; returns when all have.
  void run(int threads, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> lock(mu_);
    while (static_cast<int>(workers_.size()) < threads) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { work(id); });
    }
    body_ = &body;
    active_ = remaining_ = threads;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

 private:
  void work(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || (generation_ != seen && id < active_); });
      if (stop_) return;
      seen = generation_;
      const std::function<void(int)>* body = body_;
      lock.unlock();
      (*body)(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* body_ = nullptr;
  int active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// `kernel<<<grid, block, smem, stream>>>(args...)` becomes, in the temporary
// copy the lane compiles, `::mmk_emu::Launch("kernel", grid, block, smem, stream)(kernel, args...)`.
class Launch {
 public:
  Launch(const char* name, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr)
      : name_(name), grid_(grid), block_(block), smem_(smem) {}

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Args&&... args) const {
    static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
    if (!launch_config_ok(name_, grid_, block_, smem_)) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    // Arguments are copied, as a launch copies them into parameter space.
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    const int threads = static_cast<int>(block_.x * block_.y * block_.z);
    for (unsigned z = 0; z < grid_.z; ++z)
      for (unsigned y = 0; y < grid_.y; ++y)
        for (unsigned x = 0; x < grid_.x; ++x) run_block(kernel, params, uint3{x, y, z}, threads);
  }

 private:
  template <typename... Params>
  void run_block(void (*kernel)(Params...), const std::tuple<Params...>& params, uint3 block_index,
                 int threads) const {
    Block block(name_, threads);
    ThreadPool::get().run(threads, [&](int t) {
      threadIdx = uint3{t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y)};
      blockIdx = block_index;
      blockDim = block_;
      gridDim = grid_;
      current_block = &block;
      std::apply(kernel, params);
      block.barrier.exit();
      block.warps[t / 32]->exit();
      current_block = nullptr;
    });
  }

  const char* name_;
  dim3 grid_, block_;
  size_t smem_;
};

}  // namespace mmk_emu

inline void __syncthreads(int line = __builtin_LINE()) {
  if (mmk_emu::current_block == nullptr) mmk_emu::fail("__syncthreads() outside a kernel (line %d)", line);
  mmk_emu::current_block->barrier.arrive_and_wait(line);
}

inline cudaError_t cudaGetLastError(void) {
  const cudaError_t error = mmk_emu::last_error;
  mmk_emu::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}
