#pragma once
// Rendering of a bench run: JSON (schema_version, context, config, rows), CSV (one row per case,
// kRowColumns) and a Markdown table; every file written atomically.
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench.hpp"

namespace proxyattn::bench {

nlohmann::json row_to_json(const Row& r);
// Inverse of row_to_json (rows travel between MPI ranks as CBOR: doubles bit-exact).
Row row_from_json(const nlohmann::json& j);
std::string rows_to_csv(const std::vector<Row>& rows);
std::string rows_to_markdown(const std::vector<Row>& rows, const nlohmann::json& context);

// DIR/bench.json, DIR/bench.csv, DIR/bench.md (DIR created when missing).
void write_reports(const std::string& dir, const std::vector<Row>& rows, const nlohmann::json& context,
                   const nlohmann::json& config);

// Current UTC time, ISO 8601 ("2026-12-03T12:00:00Z"), for report contexts.
std::string utc_now();
// Median of repetitions (mean of the middle two for an even count); v not empty.
double median_of(std::vector<double> v);

}  // namespace proxyattn::bench
