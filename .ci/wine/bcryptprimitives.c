/* A stand-in for bcryptprimitives.dll, which Wine 8.0 (Debian bookworm) lacks and Rust's
 * standard library (1.78 and later) imports for ProcessPrng. Test infrastructure only: it is
 * put in the Wine prefix CI runs the Windows tests in, never shipped. ProcessPrng is answered
 * with RtlGenRandom (advapi32's SystemFunction036), which Wine has. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
