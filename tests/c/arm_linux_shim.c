/* Lets a program built for Cortex-M with arm-none-eabi-gcc and newlib (--specs=nosys.specs
 * -nostartfiles) run under qemu-arm, the Linux user-mode emulator: the few system calls
 * newlib needs become Linux EABI system calls, and the heap is a static array.
 *
 * bngen's tests use it to run Cortex-M4 code (Thumb-2, single-precision FPU, -Os) on a
 * workstation; it is not part of any exported kernel.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>

int main(void);
void _start(void);
int _read(int fd, char *buf, int len);
int _write(int fd, const char *buf, int len);
void _exit(int code);
void *_sbrk(ptrdiff_t increment);
void _init(void);
void _fini(void);

enum { SYS_EXIT = 1, SYS_READ = 3, SYS_WRITE = 4 };

static long linux_call(long number, long a, long b, long c)
{
    register long r0 __asm__("r0") = a;
    register long r1 __asm__("r1") = b;
    register long r2 __asm__("r2") = c;
    register long r7 __asm__("r7") = number;
    __asm__ volatile("svc 0" : "+r"(r0) : "r"(r1), "r"(r2), "r"(r7) : "memory");
    return r0;
}

int _read(int fd, char *buf, int len)
{
    return (int)linux_call(SYS_READ, fd, (long)buf, len);
}

int _write(int fd, const char *buf, int len)
{
    return (int)linux_call(SYS_WRITE, fd, (long)buf, len);
}

void _exit(int code)
{
    for (;;)
        linux_call(SYS_EXIT, code, 0, 0);
}

static char heap[32 << 20];
static size_t heap_used;

void *_sbrk(ptrdiff_t increment)
{
    if (increment < 0 || heap_used + (size_t)increment > sizeof heap) {
        errno = ENOMEM;
        return (void *)-1;
    }
    void *p = heap + heap_used;
    heap_used += (size_t)increment;
    return p;
}

/* -nostartfiles leaves out crti/crtn, whose empty hooks newlib's exit() calls. */
void _init(void)
{
}

void _fini(void)
{
}

void _start(void)
{
    exit(main());  /* exit, not _exit: stdout is flushed */
}
