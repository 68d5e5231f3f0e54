/* Compiled once per compiler to learn whether it accepts a flag (-fopenmp, -fopenmp-simd). */
int main(void)
{
    return 0;
}
