#pragma once
// Helpers for the method units (lib/src/methods/*.cpp): config checks and option builders.
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "proxyattn/error.hpp"
#include "proxyattn/methods.hpp"

namespace proxyattn::methods {

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw Error("estimator config: " + msg);
}
inline bool coverage_ok(double x) { return x > 0.0 && x <= 1.0; }  // false for NaN too
inline bool pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }
inline std::string num_str(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// An option bound to a field of EstimatorConfig through `ref` (a captureless lambda returning
// a reference): JSON get/set with a type check naming "<method>.<key>".
template <class Ref>
MethodOption field_option(const std::string& method, std::string key, std::string flag, std::string help, Ref ref) {
  using T = std::remove_reference_t<decltype(ref(std::declval<EstimatorConfig&>()))>;
  MethodOption o;
  o.key = key;
  o.flag = std::move(flag);
  o.help = std::move(help);
  o.get = [ref](const EstimatorConfig& c) { return nlohmann::json(ref(const_cast<EstimatorConfig&>(c))); };
  o.set = [ref, name = method + "." + key](EstimatorConfig& c, const nlohmann::json& v) {
    if constexpr (std::is_same_v<T, bool>) {
      if (!v.is_boolean()) throw Error("estimator config: " + name + ": expected true or false, got " + v.dump());
      ref(c) = v.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      const bool integral = v.is_number_integer() ||
                            (v.is_number_float() && std::isfinite(v.get<double>()) && v.get<double>() == std::floor(v.get<double>()));
      if (!integral) throw Error("estimator config: " + name + ": expected an integer, got " + v.dump());
      const double x = v.get<double>();
      if (x < static_cast<double>(std::numeric_limits<T>::min()) || x > static_cast<double>(std::numeric_limits<T>::max()))
        throw Error("estimator config: " + name + ": " + v.dump() + " is out of range");
      ref(c) = static_cast<T>(v.get<int64_t>());
    } else {
      if (!v.is_number()) throw Error("estimator config: " + name + ": expected a number, got " + v.dump());
      ref(c) = v.get<T>();
    }
  };
  return o;
}

}  // namespace proxyattn::methods
