// GGUF reader and dequantisation. Every size and offset taken from the file is checked with
// overflow-safe arithmetic before use; see gguf.hpp.
#include "proxyattn/model/gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "proxyattn/dtype.hpp"
#include "proxyattn/error.hpp"

namespace proxyattn::gguf {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr int kMaxDims = 4;              // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;
// Metadata values kept in memory, all arrays together (a tokenizer of 262K tokens with scores,
// types and merges is about 1M): a hostile file cannot make us allocate much more than the
// file's size would suggest.
constexpr uint64_t kMaxMetadataValues = uint64_t{1} << 23;

const TypeTraits kTraits[] = {
    /*0*/ {"F32", 1, 4, true},     /*1*/ {"F16", 1, 2, true},     /*2*/ {"Q4_0", 32, 18, true},
    /*3*/ {"Q4_1", 32, 20, true},  /*4*/ {},                      /*5*/ {},
    /*6*/ {"Q5_0", 32, 22, true},  /*7*/ {"Q5_1", 32, 24, true},  /*8*/ {"Q8_0", 32, 34, true},
    /*9*/ {"Q8_1", 32, 40, false}, /*10*/ {"Q2_K", 256, 84, false}, /*11*/ {"Q3_K", 256, 110, false},
    /*12*/ {"Q4_K", 256, 144, true}, /*13*/ {"Q5_K", 256, 176, true}, /*14*/ {"Q6_K", 256, 210, true},
    /*15*/ {"Q8_K", 256, 292, false}, /*16*/ {"IQ2_XXS", 256, 66, false}, /*17*/ {"IQ2_XS", 256, 74, false},
    /*18*/ {"IQ3_XXS", 256, 98, false}, /*19*/ {"IQ1_S", 256, 50, false}, /*20*/ {"IQ4_NL", 32, 18, false},
    /*21*/ {"IQ3_S", 256, 110, false}, /*22*/ {"IQ2_S", 256, 82, false}, /*23*/ {"IQ4_XS", 256, 136, false},
    /*24*/ {"I8", 1, 1, false},    /*25*/ {"I16", 1, 2, false},   /*26*/ {"I32", 1, 4, false},
    /*27*/ {"I64", 1, 8, false},   /*28*/ {"F64", 1, 8, false},   /*29*/ {"IQ1_M", 256, 56, false},
    /*30*/ {"BF16", 1, 2, true},   /*31*/ {},                     /*32*/ {},
    /*33*/ {},                     /*34*/ {"TQ1_0", 256, 54, false}, /*35*/ {"TQ2_0", 256, 66, false},
    /*36*/ {},                     /*37*/ {},                     /*38*/ {},
    /*39*/ {"MXFP4", 32, 17, false},
};

bool add_overflows(uint64_t a, uint64_t b, uint64_t* r) { return __builtin_add_overflow(a, b, r); }
bool mul_overflows(uint64_t a, uint64_t b, uint64_t* r) { return __builtin_mul_overflow(a, b, r); }

// Bounds-checked little-endian reads over the mapping.
class Cursor {
 public:
  Cursor(const uint8_t* p, uint64_t size, const std::string& path) : p_(p), size_(size), path_(path) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }
  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error("gguf " + path_ + ": " + field + ": " + what);
  }
  void need(uint64_t n, const std::string& field) const {
    if (n > left())
      fail(field, "needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) +
                      " but the file ends after " + std::to_string(left()) + " (truncated?)");
  }
  template <class T>
  T read(const std::string& field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const std::string& field) {
    const uint64_t n = read<uint64_t>(field + " (string length)");
    need(n, field);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), n);
    pos_ += n;
    return s;
  }

 private:
  const uint8_t* p_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& path_;
};

// Smallest encoding of one value of a type (to bound array counts before allocating).
uint64_t min_value_bytes(ValueType t) {
  switch (t) {
    case ValueType::u8: case ValueType::i8: case ValueType::boolean: return 1;
    case ValueType::u16: case ValueType::i16: return 2;
    case ValueType::u32: case ValueType::i32: case ValueType::f32: return 4;
    case ValueType::u64: case ValueType::i64: case ValueType::f64: case ValueType::string: return 8;
    case ValueType::array: return 12;
  }
  return 1;
}

bool valid_value_type(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::f64); }

Value read_value(Cursor& c, ValueType t, const std::string& field, int depth, uint64_t& budget) {
  if (budget == 0) c.fail(field, "metadata holds more than " + std::to_string(kMaxMetadataValues) + " values");
  --budget;
  Value v;
  v.type = t;
  auto set_signed = [&](int64_t x) { v.i = x; v.u = static_cast<uint64_t>(x); };
  auto set_unsigned = [&](uint64_t x) { v.u = x; v.i = static_cast<int64_t>(x); };
  switch (t) {
    case ValueType::u8: set_unsigned(c.read<uint8_t>(field)); break;
    case ValueType::i8: set_signed(c.read<int8_t>(field)); break;
    case ValueType::u16: set_unsigned(c.read<uint16_t>(field)); break;
    case ValueType::i16: set_signed(c.read<int16_t>(field)); break;
    case ValueType::u32: set_unsigned(c.read<uint32_t>(field)); break;
    case ValueType::i32: set_signed(c.read<int32_t>(field)); break;
    case ValueType::u64: set_unsigned(c.read<uint64_t>(field)); break;
    case ValueType::i64: set_signed(c.read<int64_t>(field)); break;
    case ValueType::f32: v.f = c.read<float>(field); break;
    case ValueType::f64: v.f = c.read<double>(field); break;
    case ValueType::boolean: {
      const uint8_t b = c.read<uint8_t>(field);
      if (b > 1) c.fail(field, "bool value " + std::to_string(b) + " is not 0 or 1");
      set_unsigned(b);
      break;
    }
    case ValueType::string: v.s = c.read_string(field); break;
    case ValueType::array: {
      if (depth >= kMaxArrayDepth) c.fail(field, "arrays nested deeper than " + std::to_string(kMaxArrayDepth));
      const uint32_t et = c.read<uint32_t>(field + " (array type)");
      if (!valid_value_type(et)) c.fail(field, "array element type " + std::to_string(et) + " is not a GGUF value type");
      v.elem_type = static_cast<ValueType>(et);
      const uint64_t n = c.read<uint64_t>(field + " (array length)");
      if (n > c.left() / min_value_bytes(v.elem_type))
        c.fail(field, "array of " + std::to_string(n) + " elements does not fit in the " +
                          std::to_string(c.left()) + " bytes left in the file");
      if (n > budget) c.fail(field, "metadata holds more than " + std::to_string(kMaxMetadataValues) + " values");
      v.array.reserve(n);
      for (uint64_t k = 0; k < n; ++k) v.array.push_back(read_value(c, v.elem_type, field, depth + 1, budget));
      break;
    }
  }
  return v;
}

float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

void deq_q4_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(static_cast<int>(qs[j] & 0xF) - 8);
    y[j + 16] = d * static_cast<float>(static_cast<int>(qs[j] >> 4) - 8);
  }
}
void deq_q4_1(const uint8_t* b, float* y) {
  const float d = f16(b), m = f16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(qs[j] & 0xF) + m;
    y[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}
void deq_q5_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int h0 = ((qh >> j) & 1) << 4, h1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = d * static_cast<float>(((qs[j] & 0xF) | h0) - 16);
    y[j + 16] = d * static_cast<float>(((qs[j] >> 4) | h1) - 16);
  }
}
void deq_q5_1(const uint8_t* b, float* y) {
  const float d = f16(b), m = f16(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int h0 = ((qh >> j) & 1) << 4, h1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = d * static_cast<float>((qs[j] & 0xF) | h0) + m;
    y[j + 16] = d * static_cast<float>((qs[j] >> 4) | h1) + m;
  }
}
void deq_q8_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
}
// 6-bit scale and min j of a K-quant super-block (ggml's get_scale_min_k4).
void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}
void deq_q4_k(const uint8_t* b, float* y) {
  const float d = f16(b), dmin = f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    int sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
  }
}
void deq_q5_k(const uint8_t* b, float* y) {
  const float d = f16(b), dmin = f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  unsigned u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
    int sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
  }
}
void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16(b + 208);
  for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

}  // namespace

std::string_view value_type_name(ValueType t) {
  static constexpr std::string_view names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                                "bool", "string", "array", "uint64", "int64", "float64"};
  const auto i = static_cast<uint32_t>(t);
  return i < std::size(names) ? names[i] : std::string_view("unknown");
}

bool Value::is_integer() const {
  switch (type) {
    case ValueType::u8: case ValueType::i8: case ValueType::u16: case ValueType::i16: case ValueType::u32:
    case ValueType::i32: case ValueType::u64: case ValueType::i64: return true;
    default: return false;
  }
}
int64_t Value::as_int(std::string_view what) const {
  if (!is_integer()) throw Error(std::string(what) + ": expected an integer, found " + std::string(value_type_name(type)));
  if (type == ValueType::u64 && u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    throw Error(std::string(what) + ": value " + std::to_string(u) + " is too large");
  return i;
}
double Value::as_double(std::string_view what) const {
  if (is_float()) return f;
  if (is_integer()) return type == ValueType::u64 ? static_cast<double>(u) : static_cast<double>(i);
  throw Error(std::string(what) + ": expected a number, found " + std::string(value_type_name(type)));
}
bool Value::as_bool(std::string_view what) const {
  if (type != ValueType::boolean) throw Error(std::string(what) + ": expected a bool, found " + std::string(value_type_name(type)));
  return u != 0;
}
const std::string& Value::as_string(std::string_view what) const {
  if (type != ValueType::string) throw Error(std::string(what) + ": expected a string, found " + std::string(value_type_name(type)));
  return s;
}

const TypeTraits* type_traits(uint32_t type) {
  if (type >= std::size(kTraits) || kTraits[type].name.empty()) return nullptr;
  return &kTraits[type];
}
std::string type_name(uint32_t type) {
  const TypeTraits* t = type_traits(type);
  return t ? std::string(t->name) : "type " + std::to_string(type);
}
std::string dequantizable_types() {
  std::string s;
  for (const TypeTraits& t : kTraits)
    if (t.dequantizable) s += (s.empty() ? "" : ", ") + std::string(t.name);
  return s;
}

void dequantize_row(TensorType type, const uint8_t* src, float* dst, int64_t n) {
  const TypeTraits* tr = type_traits(static_cast<uint32_t>(type));
  if (!tr || !tr->dequantizable)
    throw Error("cannot dequantise " + type_name(static_cast<uint32_t>(type)) + " (supported: " + dequantizable_types() + ")");
  if (n % tr->block_elems) throw Error("dequantise: " + std::to_string(n) + " values is not a whole number of " +
                                       std::string(tr->name) + " blocks");
  const int64_t blocks = n / tr->block_elems;
  const int be = tr->block_elems, bb = tr->block_bytes;
  switch (type) {
    case TensorType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return;
    case TensorType::F16:
      for (int64_t k = 0; k < n; ++k) dst[k] = f16(src + 2 * k);
      return;
    case TensorType::BF16:
      for (int64_t k = 0; k < n; ++k) {
        uint16_t b;
        std::memcpy(&b, src + 2 * k, 2);
        dst[k] = bf16_to_float(b);
      }
      return;
    default: break;
  }
  void (*f)(const uint8_t*, float*) = nullptr;
  switch (type) {
    case TensorType::Q4_0: f = deq_q4_0; break;
    case TensorType::Q4_1: f = deq_q4_1; break;
    case TensorType::Q5_0: f = deq_q5_0; break;
    case TensorType::Q5_1: f = deq_q5_1; break;
    case TensorType::Q8_0: f = deq_q8_0; break;
    case TensorType::Q4_K: f = deq_q4_k; break;
    case TensorType::Q5_K: f = deq_q5_k; break;
    case TensorType::Q6_K: f = deq_q6_k; break;
    default: throw Error("cannot dequantise " + type_name(static_cast<uint32_t>(type)));
  }
  for (int64_t k = 0; k < blocks; ++k) f(src + k * bb, dst + k * be);
}

// ---------------------------------------------------------------------------------------------

File::File(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error("gguf " + path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("gguf " + path + ": not a regular file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ == 0) {
    ::close(fd);
    throw Error("gguf " + path + ": header: the file is empty");
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) throw Error("gguf " + path + ": cannot map (" + std::strerror(errno) + ")");
  base_ = static_cast<const uint8_t*>(p);
  try {
    parse();
  } catch (...) {
    release();
    throw;
  }
}

File::~File() { release(); }

void File::release() noexcept {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
  base_ = nullptr;
}

File::File(File&& o) noexcept { *this = std::move(o); }
File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    base_ = std::exchange(o.base_, nullptr);
    size_ = o.size_;
    version_ = o.version_;
    alignment_ = o.alignment_;
    data_offset_ = o.data_offset_;
    kv_ = std::move(o.kv_);
    kv_index_ = std::move(o.kv_index_);
    tensors_ = std::move(o.tensors_);
    tensor_index_ = std::move(o.tensor_index_);
  }
  return *this;
}

std::string File::where(std::string_view what) const { return "gguf " + path_ + ": " + std::string(what); }

void File::parse() {
  Cursor c(base_, size_, path_);
  const uint32_t magic = c.read<uint32_t>("header (magic)");
  if (magic != kMagic) c.fail("header", "not a GGUF file (bad magic)");
  version_ = c.read<uint32_t>("header (version)");
  if (version_ == 0x02000000u || version_ == 0x03000000u) c.fail("header", "big-endian GGUF files are not supported");
  if (version_ < 2 || version_ > 3) c.fail("header", "GGUF version " + std::to_string(version_) + " is not supported (2 or 3)");
  const uint64_t n_tensors = c.read<uint64_t>("header (tensor count)");
  const uint64_t n_kv = c.read<uint64_t>("header (metadata count)");
  // Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at
  // least 8 + 4 + 4 + 8 bytes: bound the counts before reserving anything.
  if (n_kv > c.left() / 13) c.fail("header (metadata count)", std::to_string(n_kv) + " entries cannot fit in the file");
  if (n_tensors > c.left() / 24) c.fail("header (tensor count)", std::to_string(n_tensors) + " tensors cannot fit in the file");

  kv_.reserve(n_kv);
  uint64_t budget = kMaxMetadataValues;
  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string field = "metadata entry " + std::to_string(k);
    std::string key = c.read_string(field + " (key)");
    const std::string kf = "metadata '" + key + "'";
    const uint32_t t = c.read<uint32_t>(kf + " (type)");
    if (!valid_value_type(t)) c.fail(kf, "value type " + std::to_string(t) + " is not a GGUF value type");
    Value v = read_value(c, static_cast<ValueType>(t), kf, 0, budget);
    if (!kv_index_.emplace(key, kv_.size()).second) c.fail(kf, "key appears twice");
    kv_.emplace_back(std::move(key), std::move(v));
  }

  if (const Value* a = find("general.alignment")) {
    if (a->type != ValueType::u32) c.fail("metadata 'general.alignment'", "expected uint32, found " + std::string(value_type_name(a->type)));
    if (a->u == 0 || (a->u & (a->u - 1)) != 0) c.fail("metadata 'general.alignment'", std::to_string(a->u) + " is not a power of two");
    alignment_ = a->u;
  }

  tensors_.reserve(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo ti;
    ti.name = c.read_string("tensor info " + std::to_string(k) + " (name)");
    const std::string tf = "tensor '" + ti.name + "'";
    const uint32_t nd = c.read<uint32_t>(tf + " (dims)");
    if (nd > kMaxDims) c.fail(tf, std::to_string(nd) + " dimensions (at most " + std::to_string(kMaxDims) + ")");
    uint64_t elements = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t ne = c.read<uint64_t>(tf + " (shape)");
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        c.fail(tf, "dimension " + std::to_string(d) + " has size " + std::to_string(ne));
      if (mul_overflows(elements, ne, &elements) || elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        c.fail(tf, "element count overflows");
      ti.shape.push_back(static_cast<int64_t>(ne));
    }
    ti.elements = static_cast<int64_t>(elements);
    const uint32_t type = c.read<uint32_t>(tf + " (type)");
    const TypeTraits* tr = type_traits(type);
    if (!tr) c.fail(tf, "unknown tensor type id " + std::to_string(type));
    ti.type = static_cast<TensorType>(type);
    if (ti.cols() % tr->block_elems)
      c.fail(tf, "row length " + std::to_string(ti.cols()) + " is not a multiple of the " + std::string(tr->name) +
                     " block (" + std::to_string(tr->block_elems) + ")");
    uint64_t nbytes;
    if (mul_overflows(elements / tr->block_elems, static_cast<uint64_t>(tr->block_bytes), &nbytes))
      c.fail(tf, "byte size overflows");
    ti.nbytes = nbytes;
    ti.offset = c.read<uint64_t>(tf + " (offset)");  // relative for now
    if (ti.offset % alignment_) c.fail(tf, "data offset " + std::to_string(ti.offset) + " is not a multiple of the alignment " + std::to_string(alignment_));
    if (!tensor_index_.emplace(ti.name, tensors_.size()).second) c.fail(tf, "name appears twice");
    tensors_.push_back(std::move(ti));
  }

  // Tensor data starts at the next multiple of the alignment.
  uint64_t start = c.pos();
  if (start % alignment_ && add_overflows(start, alignment_ - start % alignment_, &start)) c.fail("data offset", "overflows");
  if (start > size_ && !tensors_.empty()) c.fail("data offset", "tensor data would start at " + std::to_string(start) + ", past the end of the file (" + std::to_string(size_) + " bytes)");
  data_offset_ = start;
  for (TensorInfo& ti : tensors_) {
    uint64_t begin, end;
    if (add_overflows(data_offset_, ti.offset, &begin) || add_overflows(begin, ti.nbytes, &end) || end > size_)
      c.fail("tensor '" + ti.name + "'", "data [" + std::to_string(ti.offset) + " + " + std::to_string(ti.nbytes) +
                                             " bytes] past the end of the file (truncated?)");
    ti.offset = begin;
  }
}

const Value* File::find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}
const Value& File::get(std::string_view key) const {
  const Value* v = find(key);
  if (!v) throw Error(where("metadata key '" + std::string(key) + "' is missing"));
  return *v;
}
int64_t File::get_int(std::string_view key) const { return get(key).as_int(where("metadata '" + std::string(key) + "'")); }
int64_t File::get_int(std::string_view key, int64_t fallback) const {
  const Value* v = find(key);
  return v ? v->as_int(where("metadata '" + std::string(key) + "'")) : fallback;
}
double File::get_double(std::string_view key, double fallback) const {
  const Value* v = find(key);
  return v ? v->as_double(where("metadata '" + std::string(key) + "'")) : fallback;
}
std::string File::get_string(std::string_view key, const std::string& fallback) const {
  const Value* v = find(key);
  return v ? v->as_string(where("metadata '" + std::string(key) + "'")) : fallback;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}
const TensorInfo& File::tensor(std::string_view name) const {
  const TensorInfo* t = find_tensor(name);
  if (!t) throw Error(where("tensor '" + std::string(name) + "' is missing"));
  return *t;
}
std::span<const uint8_t> File::data(const TensorInfo& t) const { return {base_ + t.offset, t.nbytes}; }

void File::dequantize_rows(const TensorInfo& t, int64_t row0, int64_t nrows, float* out) const {
  if (row0 < 0 || nrows < 0 || row0 > t.rows() || nrows > t.rows() - row0)
    throw Error(where("tensor '" + t.name + "': rows " + std::to_string(row0) + "+" + std::to_string(nrows) +
                      " outside [0, " + std::to_string(t.rows()) + ")"));
  const TypeTraits* tr = type_traits(static_cast<uint32_t>(t.type));
  if (!tr || !tr->dequantizable)
    throw Error(where("tensor '" + t.name + "': type " + type_name(static_cast<uint32_t>(t.type)) +
                      " cannot be dequantised (supported: " + dequantizable_types() + ")"));
  const uint64_t rb = t.row_bytes();
  const uint8_t* src = base_ + t.offset;
  for (int64_t r = 0; r < nrows; ++r)
    dequantize_row(t.type, src + static_cast<uint64_t>(row0 + r) * rb, out + r * t.cols(), t.cols());
}

std::vector<float> File::dequantize(const TensorInfo& t) const {
  std::vector<float> out(static_cast<size_t>(t.elements));
  dequantize_rows(t, 0, t.rows(), out.data());
  return out;
}

}  // namespace proxyattn::gguf
