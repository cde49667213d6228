/* loraserve: grow(&buf, &cap, n): a buffer kept by one thread and grown to its largest need; pasted into the
   kernels that use it (server/core/native.py). */
#include <stdlib.h>
static float* grow(float** buf, size_t* cap, size_t n) {
  if (n > *cap) {
    free(*buf);
    *buf = (float*)aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    *cap = *buf ? n : 0;
  }
  return *buf;
}
