#pragma once
// GGUF reader: header, metadata key/values (every value type, nested arrays), tensor table,
// alignment and data offset, and dequantisation of tensor rows to float32.
//
// The file is memory-mapped read-only. Every count, length, size and offset read from it is
// checked when the file is opened (overflow-safe arithmetic; every string, array, tensor info
// and tensor's data inside the file), so no later access can leave the mapping. A bad file is
// one Error: "gguf <path>: <field>: <what>". Metadata is bounded too: arrays nest at most 8
// deep and the file holds at most 2^23 metadata values in all.
//
// Dequantisation (bit-exact with the `gguf` Python package and ggml's reference code):
// F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K. Other known types can be
// opened and listed but not dequantised (an Error naming the tensor and the type).
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace proxyattn::gguf {

// Metadata value types (GGUF spec numbering).
enum class ValueType : uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8,
  array = 9, u64 = 10, i64 = 11, f64 = 12,
};
std::string_view value_type_name(ValueType t);

// One metadata value. Integers are kept as int64 (u64 values above INT64_MAX as uint64 in
// `u`), floats as double; arrays hold their elements (all of elem_type).
struct Value {
  ValueType type = ValueType::u8;
  ValueType elem_type = ValueType::u8;  // arrays only
  int64_t i = 0;                        // every integer type (and bool as 0/1)
  uint64_t u = 0;                       // every unsigned type, exact
  double f = 0;                         // f32/f64
  std::string s;                        // string
  std::vector<Value> array;             // array

  bool is_integer() const;
  bool is_float() const { return type == ValueType::f32 || type == ValueType::f64; }
  bool is_array() const { return type == ValueType::array; }
  // Checked conversions: throw Error (naming `what`) on a type that does not convert.
  int64_t as_int(std::string_view what) const;     // integers; u64 > INT64_MAX is an error
  double as_double(std::string_view what) const;   // integers and floats
  bool as_bool(std::string_view what) const;       // bool
  const std::string& as_string(std::string_view what) const;
};

// ggml tensor types (ggml numbering).
enum class TensorType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10,
  Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, IQ2_XXS = 16, IQ2_XS = 17,
  IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23, I8 = 24,
  I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35,
  MXFP4 = 39,
};
struct TypeTraits {
  std::string_view name;
  int block_elems = 0;  // values per block
  int block_bytes = 0;  // bytes per block
  bool dequantizable = false;
};
// Traits of a type id; nullptr for an id this reader does not know.
const TypeTraits* type_traits(uint32_t type);
std::string type_name(uint32_t type);  // "Q4_1", or "type 77" for an unknown id
// Type names this reader can dequantise, comma-separated (for error messages).
std::string dequantizable_types();

// Dequantise n values of one row (n a multiple of the type's block) from src to dst.
// Throws Error for a type that cannot be dequantised.
void dequantize_row(TensorType type, const uint8_t* src, float* dst, int64_t n);

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;  // ne0 first (ne0 = the contiguous dimension, "columns")
  TensorType type = TensorType::F32;
  uint64_t offset = 0;         // from the start of the file (data offset + relative offset)
  uint64_t nbytes = 0;
  int64_t elements = 0;
  int64_t cols() const { return shape.empty() ? 1 : shape[0]; }
  int64_t rows() const { return shape.empty() ? 1 : elements / shape[0]; }
  uint64_t row_bytes() const { return rows() ? nbytes / static_cast<uint64_t>(rows()) : 0; }
};

class File {
 public:
  // Maps and validates the file; throws Error "gguf <path>: <field>: <what>".
  explicit File(const std::string& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  File(File&& o) noexcept;
  File& operator=(File&& o) noexcept;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  uint64_t file_size() const { return size_; }

  // Metadata, in file order.
  const std::vector<std::pair<std::string, Value>>& metadata() const { return kv_; }
  const Value* find(std::string_view key) const;
  const Value& get(std::string_view key) const;  // throws "metadata key 'k' is missing"
  int64_t get_int(std::string_view key) const;
  int64_t get_int(std::string_view key, int64_t fallback) const;
  double get_double(std::string_view key, double fallback) const;
  std::string get_string(std::string_view key, const std::string& fallback) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;
  const TensorInfo& tensor(std::string_view name) const;  // throws "tensor 'x' is missing"
  std::span<const uint8_t> data(const TensorInfo& t) const;

  // Rows [row0, row0 + nrows) of a tensor (rows = product of dims past ne0), as float32,
  // written contiguously to out (nrows * cols floats). Throws on a range outside the tensor
  // or an undequantisable type (naming the tensor).
  void dequantize_rows(const TensorInfo& t, int64_t row0, int64_t nrows, float* out) const;
  std::vector<float> dequantize(const TensorInfo& t) const;

  // "gguf <path>: <what>" (for callers that validate the model's contents).
  std::string where(std::string_view what) const;

 private:
  void parse();
  void release() noexcept;
  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, Value>> kv_;
  std::map<std::string, size_t, std::less<>> kv_index_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace proxyattn::gguf
