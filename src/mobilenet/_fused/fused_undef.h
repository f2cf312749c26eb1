/* Forgets the macros one build of fused_impl.h was instantiated with, so fused.c can define the next build's. */
#undef SFX
#undef TARGET
#undef VEC
#undef VW
#undef MR
#undef NB
#undef VLOAD
#undef VSTORE
#undef VLOAD_PART
#undef VSTORE_PART
#undef VSET1
#undef VFMA
#undef VADD
#undef VMUL
#undef VMAX
#undef VMIN
