/*
 * bcryptprimitives.dll for running Windows builds of Rust programs under Wine 8 (Debian 12).
 *
 * Rust's standard library (1.78 and later) draws its random numbers (HashMap keys, among others)
 * from ProcessPrng in bcryptprimitives.dll, which Windows 10 and later have and Wine 8 does not:
 * without it the .exe does not start. Placed beside the .exe, this DLL provides ProcessPrng on
 * top of advapi32's SystemFunction036 (RtlGenRandom), which Wine has. Only for Wine: never ship
 * it with the .exe, Windows has the real one.
 *
 * Built by scripts/windows/wine-prng.sh:
 *   x86_64-w64-mingw32-gcc -shared -O2 -o bcryptprimitives.dll bcryptprimitives.c -ladvapi32
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

/* Fills data with len random bytes; TRUE on success, as Windows' ProcessPrng (which never fails). */
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        /* SystemFunction036 takes a ULONG length: feed it at most 1 GiB at a time. */
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
