#pragma once
// proxyattn-bench prefill (prefill.cpp): time to first token of a whole model on the GPU.
namespace proxyattn::bench {
// argv[0] is "prefill"; returns the exit code.
int prefill_main(int argc, char** argv);
}  // namespace proxyattn::bench
