// A planted data race: two threads increment one plain int. Built with -fsanitize=thread it must
// make ThreadSanitizer report and exit non-zero, which shows that the TSan run of the kernel
// driver (.ci/native_checks.sh tsan) would see a race in the kernels' threads, not pass because
// the sanitizer is inert on this machine.
#include <cstdio>
#include <thread>

int counter = 0;

int main() {
  auto bump = [] {
    for (int i = 0; i < 100000; ++i) ++counter;
  };
  std::thread a(bump), b(bump);
  a.join();
  b.join();
  std::printf("counter = %d\n", counter);
  return 0;
}
