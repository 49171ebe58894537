#pragma once
// Compact text for sorted id lists (layers, heads): {0,1,2,3,8,10,11} -> "0-3,8,10-11".
#include <string>
#include <vector>

namespace proxyattn {

std::string format_id_ranges(const std::vector<int>& sorted_ids);

}  // namespace proxyattn
