#pragma once
// Internal to the model runtime: back-end factories.
#include <memory>
#include <string>

#include "proxyattn/model/model.hpp"

namespace proxyattn::model::detail {

std::unique_ptr<Model> load_cpu_llama(const std::string& gguf_path, const LoadOptions& opt);

}  // namespace proxyattn::model::detail
