/* loraserve: AMX tiles: ask Linux for the tile state, configure tiles 0-7; pasted inside #if __AMX_TILE__ blocks
   (server/core/native.py). */
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <immintrin.h>
typedef struct { uint8_t palette; uint8_t start_row; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; }
  __attribute__((packed)) amx_tile_config;
static int amx_request(void) {
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}
static void amx_load_tiles(const uint8_t rows[8], const uint16_t colsb[8]) {
  amx_tile_config c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) { c.rows[t] = rows[t]; c.colsb[t] = colsb[t]; }
  /* not _tile_loadconfig: gcc 12's intrinsic tells the compiler it reads 8 bytes, so the stores to rows and
     colsb above may be dropped as dead (seen at -O3); this operand is the whole 64-byte configuration */
  __asm__ volatile("ldtilecfg %0" :: "m"(c));
}
