/* Compiled once per compiler to learn whether it accepts a flag (-fopenmp, -fopenmp-simd),
 * and, with BNGEN_PROBE_F16C, whether its flags target a CPU with F16C conversions. */
#if defined(BNGEN_PROBE_F16C) && !defined(__F16C__)
#error "no F16C on this target"
#endif

int main(void)
{
    return 0;
}
