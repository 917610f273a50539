// A worker run on a few std::threads, shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace fastlmk {

// Threads worth starting: at most `limit` (0: one per hardware thread), no more than
// `tasks`, and one per `min_work_per_thread` units of `work` (starting a thread for less
// costs more than it saves).
inline int64_t thread_count(int64_t limit, int64_t tasks, int64_t work,
                            int64_t min_work_per_thread) {
  const int64_t cap = limit > 0 ? limit : std::max(1u, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, std::min({cap, tasks, work / min_work_per_thread}));
}

// Runs worker() on `threads` threads, the calling one included. The workers share their
// tasks (e.g. through an atomic counter), so when the system refuses a thread the calling
// thread still finishes all of them.
template <typename Worker>
void run_on_threads(int64_t threads, Worker&& worker) {
  std::vector<std::thread> helpers;
  try {
    for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(worker);
  } catch (const std::system_error&) {
    // Fewer threads than wanted.
  }
  worker();
  for (auto& h : helpers) h.join();
}

}  // namespace fastlmk
