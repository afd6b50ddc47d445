// main.cpp — runs every family's emulated kernel checks (see check.h).
#include "check.h"

int main() {
    check_common();
    check_elementwise();
    check_geglu();
    check_softcap();
    check_embedding();
    check_rmsnorm();
    check_rope();
    check_cross_entropy();
    check_nf4();
    check_attention();
    check_lora();
    check_gemm();
    check_reduce();
    check_adamw();
    check_dropout();
    if (failures) { std::printf("%d check(s) FAILED\n", failures); return 1; }
    std::printf("all emulated kernel checks passed\n");
    return 0;
}
