"""The identifiers the C language and its standard library reserve (C99 7.1.3, 7.26; C11's
additions), so that an exported kernel is never named like one of them.

7.1.3 reserves every identifier that starts with an underscore at file scope, every
name the library declares or defines (with external linkage always; macros and
file-scope names where their header is included, and an exported kernel's user
includes who knows what), and the name patterns of the future library directions.
"""

from __future__ import annotations

import re

KEYWORDS = frozenset("""
auto break case char const continue default do double else enum extern float for goto if inline int long
register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
_Bool _Complex _Imaginary _Alignas _Alignof _Atomic _Generic _Noreturn _Static_assert _Thread_local
""".split())

# Every identifier the headers of C99 (and C11's new ones) declare or define, header by header.
LIBRARY = frozenset("""
assert NDEBUG static_assert
complex _Complex_I imaginary _Imaginary_I I CMPLX CMPLXF CMPLXL
cacos cacosf cacosl casin casinf casinl catan catanf catanl ccos ccosf ccosl csin csinf csinl ctan ctanf ctanl
cacosh cacoshf cacoshl casinh casinhf casinhl catanh catanhf catanhl ccosh ccoshf ccoshl csinh csinhf csinhl
ctanh ctanhf ctanhl cexp cexpf cexpl clog clogf clogl cabs cabsf cabsl cpow cpowf cpowl csqrt csqrtf csqrtl
carg cargf cargl cimag cimagf cimagl conj conjf conjl cproj cprojf cprojl creal crealf creall
isalnum isalpha isblank iscntrl isdigit isgraph islower isprint ispunct isspace isupper isxdigit tolower toupper
errno EDOM EILSEQ ERANGE errno_t
fenv_t fexcept_t FE_DIVBYZERO FE_INEXACT FE_INVALID FE_OVERFLOW FE_UNDERFLOW FE_ALL_EXCEPT FE_DOWNWARD
FE_TONEAREST FE_TOWARDZERO FE_UPWARD FE_DFL_ENV feclearexcept fegetexceptflag feraiseexcept fesetexceptflag
fetestexcept fegetround fesetround fegetenv feholdexcept fesetenv feupdateenv
FLT_ROUNDS FLT_EVAL_METHOD FLT_HAS_SUBNORM DBL_HAS_SUBNORM LDBL_HAS_SUBNORM FLT_RADIX FLT_MANT_DIG DBL_MANT_DIG
LDBL_MANT_DIG FLT_DECIMAL_DIG DBL_DECIMAL_DIG LDBL_DECIMAL_DIG DECIMAL_DIG FLT_DIG DBL_DIG LDBL_DIG FLT_MIN_EXP
DBL_MIN_EXP LDBL_MIN_EXP FLT_MIN_10_EXP DBL_MIN_10_EXP LDBL_MIN_10_EXP FLT_MAX_EXP DBL_MAX_EXP LDBL_MAX_EXP
FLT_MAX_10_EXP DBL_MAX_10_EXP LDBL_MAX_10_EXP FLT_MAX DBL_MAX LDBL_MAX FLT_EPSILON DBL_EPSILON LDBL_EPSILON
FLT_MIN DBL_MIN LDBL_MIN FLT_TRUE_MIN DBL_TRUE_MIN LDBL_TRUE_MIN
imaxdiv_t imaxabs imaxdiv strtoimax strtoumax wcstoimax wcstoumax
and and_eq bitand bitor compl not not_eq or or_eq xor xor_eq
CHAR_BIT SCHAR_MIN SCHAR_MAX UCHAR_MAX CHAR_MIN CHAR_MAX MB_LEN_MAX SHRT_MIN SHRT_MAX USHRT_MAX INT_MIN INT_MAX
UINT_MAX LONG_MIN LONG_MAX ULONG_MAX LLONG_MIN LLONG_MAX ULLONG_MAX
lconv LC_ALL LC_COLLATE LC_CTYPE LC_MONETARY LC_NUMERIC LC_TIME setlocale localeconv
float_t double_t HUGE_VAL HUGE_VALF HUGE_VALL INFINITY NAN FP_INFINITE FP_NAN FP_NORMAL FP_SUBNORMAL FP_ZERO
FP_FAST_FMA FP_FAST_FMAF FP_FAST_FMAL FP_ILOGB0 FP_ILOGBNAN MATH_ERRNO MATH_ERREXCEPT math_errhandling
fpclassify isfinite isinf isnan isnormal signbit isgreater isgreaterequal isless islessequal islessgreater
isunordered
acos acosf acosl asin asinf asinl atan atanf atanl atan2 atan2f atan2l cos cosf cosl sin sinf sinl tan tanf tanl
acosh acoshf acoshl asinh asinhf asinhl atanh atanhf atanhl cosh coshf coshl sinh sinhf sinhl tanh tanhf tanhl
exp expf expl exp2 exp2f exp2l expm1 expm1f expm1l frexp frexpf frexpl ilogb ilogbf ilogbl ldexp ldexpf ldexpl
log logf logl log10 log10f log10l log1p log1pf log1pl log2 log2f log2l logb logbf logbl modf modff modfl
scalbn scalbnf scalbnl scalbln scalblnf scalblnl cbrt cbrtf cbrtl fabs fabsf fabsl hypot hypotf hypotl
pow powf powl sqrt sqrtf sqrtl erf erff erfl erfc erfcf erfcl lgamma lgammaf lgammal tgamma tgammaf tgammal
ceil ceilf ceill floor floorf floorl nearbyint nearbyintf nearbyintl rint rintf rintl lrint lrintf lrintl
llrint llrintf llrintl round roundf roundl lround lroundf lroundl llround llroundf llroundl trunc truncf truncl
fmod fmodf fmodl remainder remainderf remainderl remquo remquof remquol copysign copysignf copysignl
nan nanf nanl nextafter nextafterf nextafterl nexttoward nexttowardf nexttowardl fdim fdimf fdiml
fmax fmaxf fmaxl fmin fminf fminl fma fmaf fmal
jmp_buf setjmp longjmp
sig_atomic_t SIG_DFL SIG_ERR SIG_IGN SIGABRT SIGFPE SIGILL SIGINT SIGSEGV SIGTERM signal raise
va_list va_start va_arg va_copy va_end
alignas __alignas_is_defined alignof __alignof_is_defined
atomic_flag memory_order ATOMIC_FLAG_INIT ATOMIC_VAR_INIT kill_dependency
bool true false __bool_true_false_are_defined
ptrdiff_t size_t max_align_t wchar_t NULL offsetof
int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t uint64_t int_least8_t int_least16_t int_least32_t
int_least64_t uint_least8_t uint_least16_t uint_least32_t uint_least64_t int_fast8_t int_fast16_t int_fast32_t
int_fast64_t uint_fast8_t uint_fast16_t uint_fast32_t uint_fast64_t intptr_t uintptr_t intmax_t uintmax_t
PTRDIFF_MIN PTRDIFF_MAX SIG_ATOMIC_MIN SIG_ATOMIC_MAX SIZE_MAX WCHAR_MIN WCHAR_MAX WINT_MIN WINT_MAX
INTMAX_MIN INTMAX_MAX UINTMAX_MAX INTPTR_MIN INTPTR_MAX UINTPTR_MAX INTMAX_C UINTMAX_C
FILE fpos_t _IOFBF _IOLBF _IONBF BUFSIZ EOF FOPEN_MAX FILENAME_MAX L_tmpnam SEEK_CUR SEEK_END SEEK_SET TMP_MAX
stderr stdin stdout remove rename tmpfile tmpnam fclose fflush fopen freopen setbuf setvbuf fprintf fscanf printf
scanf snprintf sprintf sscanf vfprintf vfscanf vprintf vscanf vsnprintf vsprintf vsscanf fgetc fgets fputc fputs
getc getchar gets putc putchar puts ungetc fread fwrite fgetpos fseek fsetpos ftell rewind clearerr feof ferror
perror
div_t ldiv_t lldiv_t EXIT_FAILURE EXIT_SUCCESS RAND_MAX MB_CUR_MAX atof atoi atol atoll strtod strtof strtold
strtol strtoll strtoul strtoull rand srand calloc free malloc realloc aligned_alloc abort atexit at_quick_exit
exit _Exit quick_exit getenv system bsearch qsort abs labs llabs div ldiv lldiv mblen mbtowc wctomb mbstowcs
wcstombs
memcpy memmove strcpy strncpy strcat strncat memcmp strcmp strcoll strncmp strxfrm memchr strchr strcspn strpbrk
strrchr strspn strstr strtok memset strerror strlen
noreturn
thrd_t thrd_start_t mtx_t cnd_t tss_t tss_dtor_t once_flag ONCE_FLAG_INIT TSS_DTOR_ITERATIONS thread_local
call_once
clock_t time_t tm timespec CLOCKS_PER_SEC TIME_UTC clock difftime mktime time timespec_get asctime ctime gmtime
localtime strftime
char16_t char32_t mbstate_t mbrtoc16 c16rtomb mbrtoc32 c32rtomb
wint_t WEOF fwprintf fwscanf swprintf swscanf vfwprintf vfwscanf vswprintf vswscanf vwprintf vwscanf wprintf
wscanf fgetwc fgetws fputwc fputws fwide getwc getwchar putwc putwchar ungetwc wcstod wcstof wcstold wcstol
wcstoll wcstoul wcstoull wcscpy wcsncpy wmemcpy wmemmove wcscat wcsncat wcscmp wcscoll wcsncmp wcsxfrm wmemcmp
wcschr wcscspn wcspbrk wcsrchr wcsspn wcsstr wcstok wmemchr wcslen wmemset wcsftime btowc wctob mbsinit mbrlen
mbrtowc wcrtomb mbsrtowcs wcsrtombs
wctrans_t wctype_t iswalnum iswalpha iswblank iswcntrl iswdigit iswgraph iswlower iswprint iswpunct iswspace
iswupper iswxdigit iswctype wctype towlower towupper towctrans wctrans
main
""".split())

# The future library directions (C99 7.26, C11 7.31): names the library may add.
FUTURE = re.compile(
    r"(cerf|cerfc|cexp2|cexpm1|clog10|clog1p|clog2|clgamma|ctgamma)[fl]?"  # complex.h
    r"|(is|to)[a-z]\w*"  # ctype.h, wctype.h
    r"|E[0-9A-Z]\w*"  # errno.h
    r"|(PRI|SCN)[a-zX]\w*"  # inttypes.h
    r"|LC_[A-Z]\w*"  # locale.h
    r"|SIG_?[A-Z]\w*"  # signal.h
    r"|u?int\w*_t|U?INT\w*_(MAX|MIN|C)"  # stdint.h
    r"|(str|mem|wcs)[a-z]\w*"  # stdlib.h, string.h, wchar.h
    r"|FE_[A-Z]\w*"  # fenv.h
    r"|(atomic|memory_order|cnd|mtx|thrd|tss)_[a-z]\w*|ATOMIC_[A-Z]\w*|TIME_[A-Z]\w*"  # C11
)


def reserved_because(identifier: str):
    """Why C reserves `identifier` (a phrase), or None if a program may use it."""
    if identifier in KEYWORDS:
        return "a C keyword"
    if identifier.startswith("_"):
        return "reserved in C (identifiers starting with _ belong to the implementation)"
    if identifier in LIBRARY:
        return "a name of the C standard library"
    if FUTURE.fullmatch(identifier):
        return "reserved by the C standard for future library names"
    return None
