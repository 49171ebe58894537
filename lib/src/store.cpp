// HDF5 Q/K(/V) store: reader and writer for the schema in DESIGN.md (see store.hpp).
//
// Choices worth knowing:
// - float16 in files is the IEEE half type h5py defines (a copy of IEEE_F32LE with fields
//   15/10/5/0/10, bias 15). HDF5 1.10 has no native half, and its soft conversion is slow, so we
//   read the raw 16 bits with the file's own type as memory type and convert with half_to_float.
//   (Never NATIVE_UINT16 as memory type: HDF5 would convert values, not copy bits.)
// - num_layers is the model's layer count; a store may hold a subset of layers (ids in
//   [0, num_layers)), named /layers/NN with at least two digits.
// - HDF5 is not built thread-safe on Debian: every HDF5 call runs under one process-wide lock.
// - HDF5's own error-stack printing is silenced; failures become one Error naming the file, the
//   object and the innermost HDF5 message.
#include "proxyattn/store.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/wait.h>
#include <omp.h>
#include <unistd.h>
#if PROXYATTN_HAVE_ZLIB
#include <zlib.h>
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <string_view>
#include <utility>

#include "proxyattn/checked.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/trace.hpp"
#include "proxyattn/version.hpp"

namespace proxyattn {

namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------------
// HDF5 plumbing

std::recursive_mutex& h5_mutex() {
  static std::recursive_mutex m;
  return m;
}

// How many H5Locks this thread holds (a parallel region must not start while the calling thread
// holds one: its workers would wait on the lock while the caller waits for them).
int& h5_lock_depth() {
  thread_local int depth = 0;
  return depth;
}

// Holds the HDF5 lock; also (re)silences automatic error printing, which is per thread in
// thread-safe builds.
struct H5Lock {
  std::lock_guard<std::recursive_mutex> guard{h5_mutex()};
  H5Lock() {
    ++h5_lock_depth();
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~H5Lock() { --h5_lock_depth(); }
  H5Lock(const H5Lock&) = delete;
  H5Lock& operator=(const H5Lock&) = delete;
};

herr_t innermost_cb(unsigned n, const H5E_error2_t* e, void* data) {
  if (n == 0 && e && e->desc) *static_cast<std::string*>(data) = e->desc;
  return 0;
}

// The most specific message on HDF5's error stack (e.g. "truncated file: eof = ..."), cleared.
std::string h5_detail() {
  std::string s;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_cb, &s);
  H5Eclear2(H5E_DEFAULT);
  return s.empty() ? std::string() : " (" + s + ")";
}

// Owning hid_t with its close function.
class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Handle(Handle&& o) noexcept : id_(std::exchange(o.id_, -1)), close_(o.close_) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, -1);
      close_ = o.close_;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = -1;
  }
  // Close now and report whether HDF5 succeeded (used for the file in commit()).
  bool close() {
    if (id_ < 0) return true;
    const herr_t r = close_(id_);
    id_ = -1;
    return r >= 0;
  }
  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

Handle h5type(hid_t id) { return Handle(id, H5Tclose); }
Handle h5space(hid_t id) { return Handle(id, H5Sclose); }
Handle h5plist(hid_t id) { return Handle(id, H5Pclose); }

// Throws Error(ctx + ": " + what + HDF5 detail) when id < 0 / status < 0.
hid_t check_id(hid_t id, const std::string& ctx) {
  if (id < 0) throw Error(ctx + h5_detail());
  return id;
}
void check_status(herr_t st, const std::string& ctx) {
  if (st < 0) throw Error(ctx + h5_detail());
}

// IEEE binary16 as h5py defines it.
Handle make_half_type() {
  Handle t = h5type(H5Tcopy(H5T_IEEE_F32LE));
  if (!t.valid() || H5Tset_fields(t, 15, 10, 5, 0, 10) < 0 || H5Tset_size(t, 2) < 0 ||
      H5Tset_ebias(t, 15) < 0)
    throw Error("cannot build the HDF5 float16 type" + h5_detail());
  return t;
}

// h5py's numpy-bool type: enum of int8 {FALSE = 0, TRUE = 1}.
Handle make_bool_type() {
  Handle t = h5type(H5Tenum_create(H5T_STD_I8LE));
  const int8_t f = 0, tr = 1;
  if (!t.valid() || H5Tenum_insert(t, "FALSE", &f) < 0 || H5Tenum_insert(t, "TRUE", &tr) < 0)
    throw Error("cannot build the HDF5 bool type" + h5_detail());
  return t;
}

Handle make_vlen_utf8() {
  Handle t = h5type(H5Tcopy(H5T_C_S1));
  if (!t.valid() || H5Tset_size(t, H5T_VARIABLE) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0)
    throw Error("cannot build the HDF5 string type" + h5_detail());
  return t;
}

std::string class_name(H5T_class_t c) {
  switch (c) {
    case H5T_INTEGER: return "integer";
    case H5T_FLOAT: return "float";
    case H5T_STRING: return "string";
    case H5T_BITFIELD: return "bitfield";
    case H5T_OPAQUE: return "opaque";
    case H5T_COMPOUND: return "compound";
    case H5T_REFERENCE: return "reference";
    case H5T_ENUM: return "enum";
    case H5T_VLEN: return "variable-length";
    case H5T_ARRAY: return "array";
    default: return "unknown";
  }
}

std::string shape_str(const std::vector<hsize_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + "]";
}

// Storage float type of a dataset; `swap` set when the 16-bit data is big-endian.
struct FloatKind {
  DType dtype;
  bool big_endian = false;
};

// Classifies a float type as f32 / f16 / bf16 by its bit layout, not just its size.
FloatKind classify_float(hid_t t, const std::string& what) {
  const H5T_class_t c = H5Tget_class(t);
  if (c != H5T_FLOAT)
    throw Error(what + ": expected float16 or float32 data, found " + class_name(c));
  const size_t size = H5Tget_size(t);
  size_t spos = 0, epos = 0, esize = 0, mpos = 0, msize = 0;
  H5Tget_fields(t, &spos, &epos, &esize, &mpos, &msize);
  const size_t bias = H5Tget_ebias(t);
  const bool be = H5Tget_order(t) == H5T_ORDER_BE;
  if (size == 4 && spos == 31 && epos == 23 && esize == 8 && mpos == 0 && msize == 23 && bias == 127)
    return {DType::f32, be};
  if (size == 2 && spos == 15 && epos == 10 && esize == 5 && mpos == 0 && msize == 10 && bias == 15)
    return {DType::f16, be};
  if (size == 2 && spos == 15 && epos == 7 && esize == 8 && mpos == 0 && msize == 7 && bias == 127)
    return {DType::bf16, be};
  throw Error(what + ": unsupported float type (" + std::to_string(size * 8) +
              "-bit); expected float16 or float32");
}

// ---------------------------------------------------------------------------------------------
// Attributes

// Attributes larger than this are refused before reading (ours are a few hundred bytes).
constexpr hsize_t kMaxAttrBytes = hsize_t{1} << 20;
constexpr hsize_t kMaxAttrCount = 4096;

struct AttrReader {
  hid_t obj;
  std::string ctx;  // "<file>" or "<file>: /needle"
  // Names and stored sizes of the object's attributes, listed once (index()) before any is
  // read: a corrupt attribute table fails here with an error instead of deep in a read.
  std::map<std::string, hsize_t> names{};
  bool indexed = false;

  std::string where(const char* name) const { return ctx + ": attribute " + name; }

  static herr_t index_cb(hid_t, const char* name, const H5A_info_t* info, void* data) {
    auto* self = static_cast<AttrReader*>(data);
    if (!name || !info || self->names.size() >= kMaxAttrCount) return -1;
    self->names[name] = info->data_size;
    return 0;
  }

  void index() {
    H5O_info_t oi;
    check_status(H5Oget_info2(obj, &oi, H5O_INFO_NUM_ATTRS), ctx + ": cannot read the object header");
    if (oi.num_attrs > kMaxAttrCount)
      throw Error(ctx + ": " + std::to_string(oi.num_attrs) + " attributes (corrupt object header?)");
    hsize_t idx = 0;
    if (H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_INC, &idx, index_cb, this) < 0)
      throw Error(ctx + ": cannot list attributes (corrupt object header?)" + h5_detail());
    if (names.size() != oi.num_attrs)
      throw Error(ctx + ": attribute count " + std::to_string(oi.num_attrs) + " disagrees with the " +
                  std::to_string(names.size()) + " listed (corrupt object header?)");
    indexed = true;
  }

  bool exists(const char* name) const {
    if (indexed) return names.count(name) > 0;
    const htri_t e = H5Aexists(obj, name);
    if (e < 0) throw Error(where(name) + ": cannot query" + h5_detail());
    return e > 0;
  }

  // Opens a one-value attribute; returns it with its file type.
  std::pair<Handle, Handle> open(const char* name) const {
    if (!exists(name)) throw Error(where(name) + ": missing");
    if (indexed && names.at(name) > kMaxAttrBytes)
      throw Error(where(name) + ": " + std::to_string(names.at(name)) + " bytes stored, expected one small value");
    Handle a(check_id(H5Aopen(obj, name, H5P_DEFAULT), where(name) + ": cannot open"), H5Aclose);
    Handle sp = h5space(check_id(H5Aget_space(a), where(name) + ": cannot read dataspace"));
    const hssize_t n = H5Sget_simple_extent_npoints(sp);
    if (n != 1)
      throw Error(where(name) + ": expected a single value, found " + std::to_string(n));
    Handle t = h5type(check_id(H5Aget_type(a), where(name) + ": cannot read type"));
    return {std::move(a), std::move(t)};
  }

  int64_t integer(const char* name) const {
    auto [a, t] = open(name);
    const H5T_class_t c = H5Tget_class(t);
    if (c == H5T_INTEGER) {
      int64_t v = 0;
      check_status(H5Aread(a, H5T_NATIVE_INT64, &v), where(name) + ": cannot read");
      return v;
    }
    if (c == H5T_ENUM) return enum_value(a, t, name);
    throw Error(where(name) + ": expected an integer, found " + class_name(c));
  }

  // Enums (h5py's bool is enum int8 {FALSE, TRUE}) are read with their native enum type and
  // the stored integer converted from the base type.
  int64_t enum_value(hid_t a, hid_t t, const char* name) const {
    Handle native = h5type(check_id(H5Tget_native_type(t, H5T_DIR_ASCEND), where(name) + ": bad enum"));
    alignas(8) unsigned char buf[16] = {};
    if (H5Tget_size(native) > 8) throw Error(where(name) + ": enum base type too wide");
    check_status(H5Aread(a, native, buf), where(name) + ": cannot read");
    Handle base = h5type(check_id(H5Tget_super(native), where(name) + ": bad enum"));
    check_status(H5Tconvert(base, H5T_NATIVE_INT64, 1, buf, nullptr, H5P_DEFAULT),
                 where(name) + ": cannot convert enum value");
    int64_t v = 0;
    std::memcpy(&v, buf, sizeof v);
    return v;
  }

  double real(const char* name) const {
    auto [a, t] = open(name);
    const H5T_class_t c = H5Tget_class(t);
    if (c != H5T_FLOAT && c != H5T_INTEGER)
      throw Error(where(name) + ": expected a number, found " + class_name(c));
    double v = 0;
    check_status(H5Aread(a, H5T_NATIVE_DOUBLE, &v), where(name) + ": cannot read");
    return v;
  }

  bool boolean(const char* name) const {
    auto [a, t] = open(name);
    const H5T_class_t c = H5Tget_class(t);
    int64_t v = 0;
    if (c == H5T_INTEGER) {
      check_status(H5Aread(a, H5T_NATIVE_INT64, &v), where(name) + ": cannot read");
    } else if (c == H5T_ENUM) {
      v = enum_value(a, t, name);
    } else {
      throw Error(where(name) + ": expected a bool or integer, found " + class_name(c));
    }
    if (v != 0 && v != 1) throw Error(where(name) + ": expected 0 or 1, found " + std::to_string(v));
    return v != 0;
  }

  std::string string(const char* name) const {
    auto [a, t] = open(name);
    const H5T_class_t c = H5Tget_class(t);
    if (c != H5T_STRING) throw Error(where(name) + ": expected a string, found " + class_name(c));
    const H5T_cset_t cset = H5Tget_cset(t);
    if (H5Tis_variable_str(t) > 0) {
      Handle mem = h5type(H5Tcopy(H5T_C_S1));
      H5Tset_size(mem, H5T_VARIABLE);
      H5Tset_cset(mem, cset);
      char* p = nullptr;
      check_status(H5Aread(a, mem, &p), where(name) + ": cannot read");
      std::string s = p ? p : "";
      if (p) H5free_memory(p);
      return s;
    }
    const size_t size = H5Tget_size(t);
    if (size == 0 || size > kMaxAttrBytes)
      throw Error(where(name) + ": fixed-length string of " + std::to_string(size) + " bytes");
    Handle mem = h5type(H5Tcopy(H5T_C_S1));
    H5Tset_size(mem, size);
    H5Tset_cset(mem, cset);
    H5Tset_strpad(mem, H5Tget_strpad(t));
    std::vector<char> buf(size + 1, '\0');
    check_status(H5Aread(a, mem, buf.data()), where(name) + ": cannot read");
    std::string s(buf.data(), strnlen(buf.data(), size));
    if (H5Tget_strpad(t) == H5T_STR_SPACEPAD)
      while (!s.empty() && s.back() == ' ') s.pop_back();
    return s;
  }
};

void write_attr(hid_t obj, const char* name, hid_t ftype, hid_t mtype, const void* value,
                const std::string& ctx) {
  Handle sp = h5space(H5Screate(H5S_SCALAR));
  Handle a(check_id(H5Acreate2(obj, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT),
                    ctx + ": cannot create attribute " + name),
           H5Aclose);
  check_status(H5Awrite(a, mtype, value), ctx + ": cannot write attribute " + name);
}
void write_attr_int(hid_t obj, const char* name, int64_t v, const std::string& ctx) {
  write_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, ctx);
}
void write_attr_double(hid_t obj, const char* name, double v, const std::string& ctx) {
  write_attr(obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v, ctx);
}
void write_attr_bool(hid_t obj, const char* name, bool v, const std::string& ctx) {
  Handle t = make_bool_type();
  const int8_t b = v ? 1 : 0;
  write_attr(obj, name, t, t, &b, ctx);
}
void write_attr_str(hid_t obj, const char* name, const std::string& v, const std::string& ctx) {
  Handle t = make_vlen_utf8();
  const char* p = v.c_str();
  write_attr(obj, name, t, t, &p, ctx);
}

// ---------------------------------------------------------------------------------------------
// Layout helpers

std::string layer_group_name(int layer, int num_layers) {
  const int width = std::max<int>(2, static_cast<int>(std::to_string(std::max(num_layers - 1, 0)).size()));
  std::string s = std::to_string(layer);
  if (static_cast<int>(s.size()) < width) s.insert(0, width - s.size(), '0');
  return s;
}

bool link_exists(hid_t loc, const std::string& name) {
  const htri_t e = H5Lexists(loc, name.c_str(), H5P_DEFAULT);
  H5Eclear2(H5E_DEFAULT);
  return e > 0;
}

// The link `name` in loc must be a hard link to an object of `type` (group or dataset): soft
// and external links (which may point outside the file) are refused before anything is opened.
void require_hard_link(hid_t loc, const std::string& name, H5O_type_t type, const std::string& what) {
  H5L_info_t li;
  if (H5Lget_info(loc, name.c_str(), &li, H5P_DEFAULT) < 0) throw Error(what + ": cannot read the link" + h5_detail());
  if (li.type == H5L_TYPE_EXTERNAL)
    throw Error(what + ": is an external link (to another file); stores must be self-contained");
  if (li.type != H5L_TYPE_HARD) throw Error(what + ": is a soft or user-defined link; expected the object itself");
  H5O_info_t oi;
  if (H5Oget_info_by_name2(loc, name.c_str(), &oi, H5O_INFO_BASIC, H5P_DEFAULT) < 0)
    throw Error(what + ": cannot read the object header" + h5_detail());
  if (oi.type != type)
    throw Error(what + ": is not a " + std::string(type == H5O_TYPE_GROUP ? "group" : "dataset"));
}

// Storage of a dataset: only data inside this file (contiguous, chunked or compact; no external
// raw-data files, no virtual datasets), only the filters h5py reads without plugins (shuffle,
// gzip, Fletcher-32), every byte of the extent actually stored (no silent fill values), and
// Fletcher-32 checksums verified on read where present. `elem` is the element size in bytes.
void check_storage(hid_t ds, const std::vector<hsize_t>& dims, size_t elem, const std::string& what) {
  Handle dcpl = h5plist(check_id(H5Dget_create_plist(ds), what + ": cannot read the creation properties"));
  const H5D_layout_t layout = H5Pget_layout(dcpl);
  if (layout == H5D_VIRTUAL)
    throw Error(what + ": is a virtual dataset (data mapped from other datasets/files); not supported");
  if (layout != H5D_CONTIGUOUS && layout != H5D_CHUNKED && layout != H5D_COMPACT)
    throw Error(what + ": unsupported storage layout" + h5_detail());
  const int next = H5Pget_external_count(dcpl);
  if (next != 0)
    throw Error(what + ": uses external storage (raw data in " +
                (next > 0 ? std::to_string(next) + " other file(s)" : std::string("other files")) +
                "); stores must be self-contained");
  int64_t total = static_cast<int64_t>(elem);
  for (hsize_t d : dims) {
    if (d > static_cast<hsize_t>(INT64_MAX)) throw Error(what + ": extent too large");
    total = checked_mul(total, static_cast<int64_t>(d), what);
  }
  const int nf = H5Pget_nfilters(dcpl);
  if (nf < 0) throw Error(what + ": cannot read the filter pipeline" + h5_detail());
  for (int i = 0; i < nf; ++i) {
    unsigned flags = 0, fc = 0;
    size_t ne = 0;
    unsigned vals[8] = {};
    char fname[64] = {};
    const H5Z_filter_t id = H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &ne, vals, sizeof fname, fname, &fc);
    if (id != H5Z_FILTER_DEFLATE && id != H5Z_FILTER_SHUFFLE && id != H5Z_FILTER_FLETCHER32)
      throw Error(what + ": filter " + std::to_string(id) + (fname[0] ? std::string(" (") + fname + ")" : "") +
                  " not supported (only shuffle, gzip and Fletcher-32)");
  }
  if (layout == H5D_CHUNKED) {
    std::vector<hsize_t> chunk(dims.size());
    const int cr = H5Pget_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
    if (cr != static_cast<int>(dims.size())) throw Error(what + ": chunk rank differs from the dataset rank");
    int64_t cbytes = static_cast<int64_t>(elem), nchunks = 1;
    for (size_t i = 0; i < dims.size(); ++i) {
      if (chunk[i] == 0 || chunk[i] > (hsize_t{1} << 32)) throw Error(what + ": invalid chunk shape");
      cbytes = checked_mul(cbytes, static_cast<int64_t>(chunk[i]), what + ": chunk");
      nchunks = checked_mul(nchunks, static_cast<int64_t>((dims[i] + chunk[i] - 1) / chunk[i]), what + ": chunks");
    }
    if (cbytes > (int64_t{1} << 30)) throw Error(what + ": chunks of " + format_bytes(cbytes) + " (limit 1 GiB)");
    if (total > 0) {
      hsize_t have = 0;
      Handle space = h5space(check_id(H5Dget_space(ds), what + ": cannot read dataspace"));
      check_status(H5Dget_num_chunks(ds, space, &have), what + ": cannot count chunks");
      if (static_cast<int64_t>(have) != nchunks)
        throw Error(what + ": " + std::to_string(have) + " of " + std::to_string(nchunks) +
                    " chunks stored (incomplete or truncated dataset)");
    }
  } else if (layout == H5D_CONTIGUOUS && total > 0) {
    haddr_t addr = H5Dget_offset(ds);
    const hsize_t have = H5Dget_storage_size(ds);
    if (addr == HADDR_UNDEF || static_cast<int64_t>(have) != total)
      throw Error(what + ": " + std::to_string(have) + " of " + std::to_string(total) +
                  " data bytes stored (incomplete or truncated dataset)");
  }
}

std::vector<hsize_t> dims_of(hid_t ds, const std::string& what) {
  Handle sp = h5space(check_id(H5Dget_space(ds), what + ": cannot read dataspace"));
  const int rank = H5Sget_simple_extent_ndims(sp);
  if (rank < 0) throw Error(what + ": cannot read rank" + h5_detail());
  std::vector<hsize_t> d(static_cast<size_t>(rank));
  if (rank > 0) H5Sget_simple_extent_dims(sp, d.data(), nullptr);
  return d;
}

// ---------------------------------------------------------------------------------------------
// Direct chunk reads
//
// libhdf5 is not thread-safe, so inside H5Dread every chunk's Fletcher-32 check, inflate and
// copy run on one core under the lock. For a chunked dataset whose filters are the ones we know
// (shuffle, gzip, Fletcher-32, in any order), read_window instead takes only each chunk's stored
// bytes under the lock (H5Dread_chunk, HDF5 >= 1.10.2) and undoes the filters outside it, in
// parallel over chunks, as HDF5's own filters do (H5Zfletcher32.c with H5_checksum_fletcher32,
// H5Zdeflate.c, H5Zshuffle.c). A chunk that is not exactly as expected (a filter skipped other
// than gzip, a size that disagrees, a checksum or inflate failure, any HDF5 error) is read again
// through H5Dread, so the values and every error message are HDF5's own.
// PROXYATTN_H5_DIRECT=0 reads everything through H5Dread (the path before this one).

bool direct_reads_enabled() {
  const char* e = std::getenv("PROXYATTN_H5_DIRECT");
  return !(e && std::string_view(e) == "0");
}

void reduce16(uint32_t& s) { s = (s & 0xffffu) + (s >> 16); }

// H5_checksum_fletcher32 (H5checksum.c): big-endian 16-bit words, both sums start at 0 and are
// reduced by end-around carry after every 360 words; an odd last byte is the high byte of a last
// word. Over a block of L words sum2 grows by L * sum1 + sum_k (L - k) w_k: the same uint32 as the
// word-by-word loop (both are arithmetic modulo 2^32), in a form the compiler vectorises.
uint32_t h5_fletcher32(const uint8_t* data, size_t bytes) {
  size_t len = bytes / 2;
  uint32_t sum1 = 0, sum2 = 0;
  while (len) {
    const uint32_t L = static_cast<uint32_t>(len > 360 ? 360 : len);
    len -= L;
    uint32_t s = 0, t = 0;
    for (uint32_t k = 0; k < L; ++k) {
      const uint32_t w = (static_cast<uint32_t>(data[2 * k]) << 8) | data[2 * k + 1];
      s += w;
      t += (L - k) * w;
    }
    data += 2 * static_cast<size_t>(L);
    sum2 += L * sum1 + t;
    sum1 += s;
    reduce16(sum1);
    reduce16(sum2);
  }
  if (bytes % 2) {
    sum1 += static_cast<uint32_t>(*data) << 8;
    sum2 += sum1;
    reduce16(sum1);
    reduce16(sum2);
  }
  reduce16(sum1);
  reduce16(sum2);
  return (sum2 << 16) | sum1;
}

// H5Z_filter_fletcher32 on read: n >= 4 stored bytes end with the checksum of the others, little
// endian; the checksum with the two bytes of each 16-bit half swapped is accepted too (what
// HDF5 <= 1.6.2 wrote on little-endian machines).
bool fletcher32_matches(const uint8_t* p, size_t n) {
  const uint32_t stored = static_cast<uint32_t>(p[n - 4]) | static_cast<uint32_t>(p[n - 3]) << 8 |
                          static_cast<uint32_t>(p[n - 2]) << 16 | static_cast<uint32_t>(p[n - 1]) << 24;
  const uint32_t f = h5_fletcher32(p, n - 4);
  const uint32_t reversed = ((f & 0x00ff00ffu) << 8) | ((f >> 8) & 0x00ff00ffu);
  return stored == f || stored == reversed;
}

// H5Z_filter_shuffle on read (only called with elem > 1 and at least 2 elements): byte j of
// element i is at j * (n / elem) + i; the n % elem bytes left over are copied last.
void unshuffle(const uint8_t* src, uint8_t* dst, size_t n, size_t elem) {
  const size_t m = n / elem;
  if (elem == 2) {
    for (size_t i = 0; i < m; ++i) {
      dst[2 * i] = src[i];
      dst[2 * i + 1] = src[m + i];
    }
  } else {
    for (size_t j = 0; j < elem; ++j)
      for (size_t i = 0; i < m; ++i) dst[i * elem + j] = src[j * m + i];
  }
  std::memcpy(dst + m * elem, src + m * elem, n % elem);
}

// How to read a dataset's chunks directly; made under the lock from the creation properties.
struct DirectPlan {
  hsize_t chunk[3] = {};
  size_t elem = 0;                    // bytes per value
  size_t chunk_bytes = 0;             // a chunk's values (edge chunks are stored whole too)
  size_t capacity = 0;                // the most bytes a chunk has at any filter stage (stored
                                      // gzip output may exceed its input: zlib's compressBound)
  std::vector<H5Z_filter_t> filters;  // pipeline order (undone last to first)
};

// The plan for a dataset, or nothing when its chunks must go through H5Dread: not chunked
// [c0, c1, c2], a filter (or a parameter of one) other than those H5Dread would apply as
// decode_chunk does, or (float32) a type whose conversion to float is not a plain copy.
std::optional<DirectPlan> direct_plan(hid_t ds, hid_t ftype, const FloatKind& kind) {
#if H5_VERSION_GE(1, 10, 2)
  Handle dcpl = h5plist(H5Dget_create_plist(ds));
  if (!dcpl.valid() || H5Pget_layout(dcpl) != H5D_CHUNKED) return std::nullopt;
  DirectPlan p;
  p.elem = static_cast<size_t>(dtype_size(kind.dtype));
  if (H5Tget_size(ftype) != p.elem) return std::nullopt;
  if (kind.dtype == DType::f32 && !(H5Tequal(ftype, H5T_IEEE_F32LE) > 0 || H5Tequal(ftype, H5T_IEEE_F32BE) > 0))
    return std::nullopt;
  if (H5Pget_chunk(dcpl, 3, p.chunk) != 3) return std::nullopt;
  uint64_t cb = p.elem;
  for (hsize_t c : p.chunk) {
    if (c == 0 || c > (hsize_t{1} << 30)) return std::nullopt;
    cb *= c;
    if (cb > (uint64_t{1} << 30)) return std::nullopt;  // check_storage refuses these anyway
  }
  p.chunk_bytes = static_cast<size_t>(cb);
  size_t fletchers = 0;
  const int nf = H5Pget_nfilters(dcpl);
  if (nf < 0 || nf > 3) return std::nullopt;
  for (int i = 0; i < nf; ++i) {
    unsigned flags = 0, fc = 0, vals[8] = {};
    size_t ne = 8;
    const H5Z_filter_t id = H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &ne, vals, 0, nullptr, &fc);
    if ((flags & ~static_cast<unsigned>(H5Z_FLAG_OPTIONAL)) != 0) return std::nullopt;
    if (std::find(p.filters.begin(), p.filters.end(), id) != p.filters.end()) return std::nullopt;
    if (id == H5Z_FILTER_FLETCHER32) {
      ++fletchers;
    } else if (id == H5Z_FILTER_SHUFFLE) {
      if (ne != 1 || vals[0] != p.elem) return std::nullopt;
    } else if (id == H5Z_FILTER_DEFLATE) {
#if PROXYATTN_HAVE_ZLIB
      if (ne != 1 || vals[0] > 9 || H5Zfilter_avail(H5Z_FILTER_DEFLATE) <= 0) return std::nullopt;
#else
      return std::nullopt;
#endif
    } else {
      return std::nullopt;
    }
    p.filters.push_back(id);
  }
  p.capacity = p.chunk_bytes + 4 * fletchers;
#if PROXYATTN_HAVE_ZLIB
  if (std::find(p.filters.begin(), p.filters.end(), H5Z_FILTER_DEFLATE) != p.filters.end())
    p.capacity = static_cast<size_t>(::compressBound(static_cast<uLong>(p.capacity))) + 4 * fletchers;
#endif
  return p;
#else
  (void)ds;
  (void)ftype;
  (void)kind;
  return std::nullopt;
#endif
}

// Undoes the filters of one stored chunk (n bytes in a; a and b hold plan.capacity bytes) as
// H5Z_pipeline does on read: last filter first, skipping those whose bit is set in the chunk's
// filter mask. Returns the chunk's chunk_bytes bytes (in a or b), or nullptr where H5Dread must
// decide: a skipped filter other than gzip (which HDF5 skips when it would not compress), a
// checksum mismatch, an inflate error or any size other than expected.
const uint8_t* decode_chunk(const DirectPlan& plan, uint32_t mask, uint8_t* a, uint8_t* b, size_t n) {
  const size_t nf = plan.filters.size();
  if ((mask >> nf) != 0) return nullptr;
  uint8_t* cur = a;
  uint8_t* spare = b;
  for (size_t i = nf; i-- > 0;) {
    const H5Z_filter_t id = plan.filters[i];
    if (mask & (uint32_t{1} << i)) {
      if (id != H5Z_FILTER_DEFLATE) return nullptr;
      continue;
    }
    if (id == H5Z_FILTER_FLETCHER32) {
      if (n < 4 || !fletcher32_matches(cur, n)) return nullptr;
      n -= 4;
    } else if (id == H5Z_FILTER_SHUFFLE) {
      if (plan.elem > 1 && n / plan.elem > 1) {
        unshuffle(cur, spare, n, plan.elem);
        std::swap(cur, spare);
      }
    } else if (id == H5Z_FILTER_DEFLATE) {
#if PROXYATTN_HAVE_ZLIB
      // Its input on write was the chunk plus the checksums of the Fletcher-32 filters before it.
      size_t want = plan.chunk_bytes;
      for (size_t j = 0; j < i; ++j)
        if (plan.filters[j] == H5Z_FILTER_FLETCHER32) want += 4;
      uLongf got = static_cast<uLongf>(want);
      if (::uncompress(spare, &got, cur, static_cast<uLong>(n)) != Z_OK || got != want) return nullptr;
      std::swap(cur, spare);
      n = want;
#else
      return nullptr;
#endif
    } else {
      return nullptr;
    }
  }
  return n == plan.chunk_bytes ? cur : nullptr;
}

// n stored values (file byte order) to float, counting NaN and Inf.
template <DType T, bool Swap>
void convert_values(const uint8_t* src, float* dst, int64_t n, int64_t& nan, int64_t& inf) {
  int64_t a = 0, b = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    if constexpr (T == DType::f32) {
      std::memcpy(&bits, src + 4 * i, 4);
      if constexpr (Swap) bits = __builtin_bswap32(bits);
    } else {
      uint16_t v;
      std::memcpy(&v, src + 2 * i, 2);
      if constexpr (Swap) v = __builtin_bswap16(v);
      bits = T == DType::f16 ? half_to_float_bits(v) : static_cast<uint32_t>(v) << 16;
    }
    std::memcpy(dst + i, &bits, 4);
    const uint32_t mag = bits & 0x7fffffffu;
    a += mag > 0x7f800000u;
    b += mag == 0x7f800000u;
  }
  nan += a;
  inf += b;
}

void convert_values(const FloatKind& kind, const uint8_t* src, float* dst, int64_t n, int64_t& nan, int64_t& inf) {
  const bool swap = kind.big_endian != (std::endian::native == std::endian::big);
  switch (kind.dtype) {
    case DType::f16:
      return swap ? convert_values<DType::f16, true>(src, dst, n, nan, inf)
                  : convert_values<DType::f16, false>(src, dst, n, nan, inf);
    case DType::bf16:
      return swap ? convert_values<DType::bf16, true>(src, dst, n, nan, inf)
                  : convert_values<DType::bf16, false>(src, dst, n, nan, inf);
    case DType::f32:
      return swap ? convert_values<DType::f32, true>(src, dst, n, nan, inf)
                  : convert_values<DType::f32, false>(src, dst, n, nan, inf);
  }
}

}  // namespace

std::string_view tensor_name(Tensor t) {
  switch (t) {
    case Tensor::q: return "q";
    case Tensor::k: return "k";
    case Tensor::v: return "v";
  }
  return "?";
}

Tensor parse_tensor(std::string_view s) {
  if (s == "q" || s == "Q") return Tensor::q;
  if (s == "k" || s == "K") return Tensor::k;
  if (s == "v" || s == "V") return Tensor::v;
  throw Error("unknown tensor '" + std::string(s) + "' (expected q, k or v)");
}

// =============================================================================================
// Reader

namespace {
struct DatasetInfo {
  bool present = false;
  FloatKind kind{DType::f32};
};
struct LayerInfo {
  std::string group;  // full path, e.g. "/layers/03"
  DatasetInfo ds[3];  // q, k, v
  LayerAttention attention;
};
LayerAttention read_layer_attention(hid_t group, const std::string& ctx);  // defined at the end
}  // namespace

struct StoreReader::Impl {
  std::string path;
  ReadOptions opts;
  StoreMeta meta;
  std::vector<int> layers;
  std::map<int, LayerInfo> info;
  bool has_tokens = false;
  Handle file;

  std::string ctx(const std::string& obj) const { return path + ": " + obj; }

  const LayerInfo& layer(int l) const {
    auto it = info.find(l);
    if (it == info.end()) {
      std::string have;
      for (size_t i = 0; i < layers.size(); ++i) {
        if (i) have += ',';
        have += std::to_string(layers[i]);
      }
      throw Error(path + ": layer " + std::to_string(l) + " not in store (layers present: " + have + ")");
    }
    return it->second;
  }

  int64_t heads_of(Tensor t) const { return t == Tensor::q ? meta.num_q_heads : meta.num_kv_heads; }

  std::string ds_path(int l, Tensor t) const {
    return layer(l).group + "/" + std::string(tensor_name(t));
  }

  void open_file();
  void read_meta();
  void scan_layers();
  DatasetInfo check_dataset(hid_t group, const std::string& gpath, Tensor t, bool required) const;
  Tensor3 read_window(int l, Tensor t, int64_t h0, int64_t h1, int64_t t0, int64_t t1) const;

  struct Window {
    const std::string& dpath;  // "/layers/NN/q"
    const std::string& what;   // "<file>: /layers/NN/q"
    FloatKind kind;
    int64_t h0, h1, t0, t1;
  };
  bool read_direct(const Window& w, Tensor3& out, int64_t& nan, int64_t& inf) const;
  void read_h5dread(const Window& w, Tensor3& out, int64_t& nan, int64_t& inf) const;
  struct AtomicStats {
    std::atomic<int64_t> direct_chunks{0}, h5dread_chunks{0}, h5dread_windows{0};
  };
  mutable AtomicStats stats;
};

void StoreReader::Impl::open_file() {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path + ": no such file");
  if (fs::is_directory(path, ec)) throw Error(path + ": not a regular file (is a directory)");
  if (!fs::is_regular_file(path, ec)) throw Error(path + ": not a regular file");
  if (fs::file_size(path, ec) == 0) throw Error(path + ": empty file, not an HDF5 store");
  const htri_t is = H5Fis_hdf5(path.c_str());
  if (is <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error(path + ": not an HDF5 file");
  }
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) throw Error(path + ": cannot open HDF5 file (truncated or corrupt?)" + h5_detail());
  file = Handle(f, H5Fclose);
}

void StoreReader::Impl::read_meta() {
  AttrReader ar{file, path};
  ar.index();
  auto positive_int = [&](const char* name) {
    const int64_t v = ar.integer(name);
    if (v <= 0 || v > (int64_t{1} << 30))
      throw Error(ar.where(name) + ": must be positive, found " + std::to_string(v));
    return v;
  };
  meta.num_layers = static_cast<int>(positive_int("num_layers"));
  meta.num_q_heads = static_cast<int>(positive_int("num_q_heads"));
  meta.num_kv_heads = static_cast<int>(positive_int("num_kv_heads"));
  meta.head_dim = static_cast<int>(positive_int("head_dim"));
  {
    const int64_t n = ar.integer("seq_len");
    if (n <= 0) throw Error(ar.where("seq_len") + ": must be positive, found " + std::to_string(n) + " (N = 0)");
    meta.seq_len = n;
  }
  if (meta.num_q_heads % meta.num_kv_heads != 0)
    throw Error(path + ": attributes num_q_heads=" + std::to_string(meta.num_q_heads) +
                " is not a multiple of num_kv_heads=" + std::to_string(meta.num_kv_heads));
  meta.rope_theta = ar.real("rope_theta");
  if (!(meta.rope_theta > 0) || !std::isfinite(meta.rope_theta))
    throw Error(ar.where("rope_theta") + ": must be a positive number");
  meta.rope_applied = ar.boolean("rope_applied");
  {
    const std::string d = ar.string("dtype");
    try {
      meta.dtype = parse_dtype(d);
    } catch (const Error&) {
      throw Error(ar.where("dtype") + ": unknown dtype '" + d + "'");
    }
  }
  meta.model = ar.string("model");
  meta.source = ar.string("source");
  meta.prompt_sha256 = ar.string("prompt_sha256");
  meta.creator = ar.string("creator");

  if (link_exists(file, "needle")) {
    const std::string np = "/needle";
    require_hard_link(file, "needle", H5O_TYPE_GROUP, ctx(np));
    const hid_t g = H5Gopen2(file, np.c_str(), H5P_DEFAULT);
    if (g < 0) throw Error(ctx(np) + ": not a group" + h5_detail());
    Handle gh(g, H5Gclose);
    AttrReader nr{gh, ctx(np)};
    nr.index();
    Needle n;
    n.position = nr.integer("position");
    if (n.position < 0 || n.position >= meta.seq_len)
      throw Error(nr.where("position") + ": " + std::to_string(n.position) + " outside [0, seq_len=" +
                  std::to_string(meta.seq_len) + ")");
    n.text = nr.string("text");
    meta.needle = std::move(n);
  }
}

DatasetInfo StoreReader::Impl::check_dataset(hid_t group, const std::string& gpath, Tensor t,
                                             bool required) const {
  const std::string name(tensor_name(t));
  const std::string what = ctx(gpath + "/" + name);
  DatasetInfo di;
  if (!link_exists(group, name)) {
    if (required) throw Error(what + ": missing dataset");
    return di;
  }
  require_hard_link(group, name, H5O_TYPE_DATASET, what);
  const hid_t d = H5Dopen2(group, name.c_str(), H5P_DEFAULT);
  if (d < 0) throw Error(what + ": not a dataset" + h5_detail());
  Handle ds(d, H5Dclose);
  const std::vector<hsize_t> dims = dims_of(ds, what);
  const int64_t H = heads_of(t);
  if (dims.size() != 3)
    throw Error(what + ": expected rank 3 [heads, tokens, dim], found rank " + std::to_string(dims.size()) +
                " " + shape_str(dims));
  const std::vector<hsize_t> want{static_cast<hsize_t>(H), static_cast<hsize_t>(meta.seq_len),
                                  static_cast<hsize_t>(meta.head_dim)};
  if (dims != want) {
    std::string why;
    if (dims[0] != want[0])
      why = "heads " + std::to_string(dims[0]) + " != " + (t == Tensor::q ? "num_q_heads" : "num_kv_heads") +
            "=" + std::to_string(H);
    else if (dims[1] != want[1])
      why = "tokens " + std::to_string(dims[1]) + " != seq_len=" + std::to_string(meta.seq_len);
    else
      why = "dim " + std::to_string(dims[2]) + " != head_dim=" + std::to_string(meta.head_dim) +
            (t == Tensor::q ? "" : " (d of " + name + " differs from d of q?)");
    throw Error(what + ": shape " + shape_str(dims) + " disagrees with the attributes: " + why +
                " (expected " + shape_str(want) + ")");
  }
  Handle ty = h5type(check_id(H5Dget_type(ds), what + ": cannot read type"));
  di.kind = classify_float(ty, what);
  if (di.kind.dtype != meta.dtype)
    throw Error(what + ": stored as " + std::string(dtype_name(di.kind.dtype)) +
                " but attribute dtype says " + std::string(dtype_name(meta.dtype)));
  check_storage(ds, dims, dtype_size(di.kind.dtype), what);
  di.present = true;
  return di;
}

void StoreReader::Impl::scan_layers() {
  if (!link_exists(file, "layers")) throw Error(ctx("/layers") + ": missing group");
  require_hard_link(file, "layers", H5O_TYPE_GROUP, ctx("/layers"));
  const hid_t g = H5Gopen2(file, "layers", H5P_DEFAULT);
  if (g < 0) throw Error(ctx("/layers") + ": not a group" + h5_detail());
  Handle lg(g, H5Gclose);
  H5G_info_t gi;
  check_status(H5Gget_info(lg, &gi), ctx("/layers") + ": cannot list");
  for (hsize_t i = 0; i < gi.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(lg, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (len < 0) throw Error(ctx("/layers") + ": cannot list" + h5_detail());
    std::string name(static_cast<size_t>(len) + 1, '\0');
    H5Lget_name_by_idx(lg, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT);
    name.resize(static_cast<size_t>(len));
    const std::string gpath = "/layers/" + name;
    if (name.empty() || name.size() > 9 ||
        !std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      throw Error(ctx(gpath) + ": layer group names must be layer numbers (e.g. /layers/03)");
    const int id = std::stoi(name);
    if (id >= meta.num_layers)
      throw Error(ctx(gpath) + ": layer " + std::to_string(id) + " >= num_layers=" +
                  std::to_string(meta.num_layers));
    if (info.count(id))
      throw Error(ctx(gpath) + ": duplicate layer " + std::to_string(id) + " (also " + info[id].group + ")");
    require_hard_link(lg, name, H5O_TYPE_GROUP, ctx(gpath));
    const hid_t lh = H5Gopen2(lg, name.c_str(), H5P_DEFAULT);
    if (lh < 0) throw Error(ctx(gpath) + ": not a group" + h5_detail());
    Handle lgh(lh, H5Gclose);
    LayerInfo li;
    li.group = gpath;
    li.ds[0] = check_dataset(lgh, gpath, Tensor::q, true);
    li.ds[1] = check_dataset(lgh, gpath, Tensor::k, true);
    li.ds[2] = check_dataset(lgh, gpath, Tensor::v, false);
    li.attention = read_layer_attention(lgh, ctx(gpath));
    info.emplace(id, std::move(li));
  }
  if (info.empty()) throw Error(ctx("/layers") + ": no layers stored");
  for (const auto& [id, li] : info) layers.push_back(id);

  if (link_exists(file, "tokens")) {
    const std::string what = ctx("/tokens");
    require_hard_link(file, "tokens", H5O_TYPE_DATASET, what);
    const hid_t d = H5Dopen2(file, "tokens", H5P_DEFAULT);
    if (d < 0) throw Error(what + ": not a dataset" + h5_detail());
    Handle ds(d, H5Dclose);
    const auto dims = dims_of(ds, what);
    if (dims.size() != 1)
      throw Error(what + ": expected rank 1 [seq_len], found rank " + std::to_string(dims.size()) + " " +
                  shape_str(dims));
    if (dims[0] != static_cast<hsize_t>(meta.seq_len))
      throw Error(what + ": length " + std::to_string(dims[0]) + " != seq_len=" + std::to_string(meta.seq_len));
    Handle ty = h5type(check_id(H5Dget_type(ds), what + ": cannot read type"));
    if (H5Tget_class(ty) != H5T_INTEGER)
      throw Error(what + ": expected integer token ids, found " + class_name(H5Tget_class(ty)));
    const size_t tsize = H5Tget_size(ty);
    if (tsize == 0 || tsize > 8) throw Error(what + ": integer of " + std::to_string(tsize) + " bytes");
    check_storage(ds, dims, tsize, what);
    has_tokens = true;
  }
}

Tensor3 StoreReader::Impl::read_window(int l, Tensor t, int64_t h0, int64_t h1, int64_t t0,
                                       int64_t t1) const {
  const LayerInfo& li = layer(l);
  const DatasetInfo& di = li.ds[static_cast<int>(t)];
  const std::string dpath = li.group + "/" + std::string(tensor_name(t));
  const std::string what = ctx(dpath);
  if (!di.present) throw Error(what + ": missing dataset");
  const int64_t H = heads_of(t), N = meta.seq_len;
  if (h0 < 0 || h1 < h0 || h1 > H)
    throw Error(what + ": heads " + std::to_string(h0) + ":" + std::to_string(h1) + " outside [0, " +
                std::to_string(H) + "]");
  if (t0 < 0 || t1 < t0 || t1 > N)
    throw Error(what + ": tokens " + std::to_string(t0) + ":" + std::to_string(t1) + " outside [0, " +
                std::to_string(N) + "]");
  TraceScope trace("read " + dpath);
  // Both paths below write every element of the window (or throw, and out is dropped): no
  // zero-fill first, and the direct path's threads touch the pages first, in parallel.
  Tensor3 out = Tensor3::uninitialized(h1 - h0, t1 - t0, meta.head_dim);
  if (out.size() == 0) return out;

  int64_t nan = 0, inf = 0;
  const Window w{dpath, what, di.kind, h0, h1, t0, t1};
  if (!(direct_reads_enabled() && read_direct(w, out, nan, inf))) read_h5dread(w, out, nan, inf);
  if (!opts.allow_nonfinite && (nan || inf))
    throw Error(what + ": " + std::to_string(nan) + " NaN and " + std::to_string(inf) +
                " Inf values (non-finite data is an error unless allowed, e.g. --allow-nonfinite)");
  return out;
}

// The window through H5Dread (the path for datasets read_direct does not take, and with
// PROXYATTN_H5_DIRECT=0 for all).
void StoreReader::Impl::read_h5dread(const Window& w, Tensor3& out, int64_t& nan, int64_t& inf) const {
  const std::string& what = w.what;
  const int64_t d = meta.head_dim;
  ++stats.h5dread_windows;
  {
    H5Lock lock;
    const hid_t dh = H5Dopen2(file, w.dpath.c_str(), H5P_DEFAULT);
    if (dh < 0) throw Error(what + ": cannot open" + h5_detail());
    Handle ds(dh, H5Dclose);
    Handle fspace = h5space(check_id(H5Dget_space(ds), what + ": cannot read dataspace"));
    const hsize_t n = static_cast<hsize_t>(w.t1 - w.t0);
    if (w.kind.dtype == DType::f32) {
      // HDF5 converts float32 of either byte order to native directly; one read for the window.
      const hsize_t start[3] = {static_cast<hsize_t>(w.h0), static_cast<hsize_t>(w.t0), 0};
      const hsize_t count[3] = {static_cast<hsize_t>(w.h1 - w.h0), n, static_cast<hsize_t>(d)};
      check_status(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr),
                   what + ": bad selection");
      Handle mspace = h5space(H5Screate_simple(3, count, nullptr));
      check_status(H5Dread(ds, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, out.data()),
                   what + ": read failed");
    } else {
      // 16-bit: raw bits with the file's own type as memory type, one head at a time (bounded
      // scratch), converted here.
      Handle ftype = h5type(check_id(H5Dget_type(ds), what + ": cannot read type"));
      const hsize_t count[3] = {1, n, static_cast<hsize_t>(d)};
      Handle mspace = h5space(H5Screate_simple(3, count, nullptr));
      std::vector<uint16_t> raw(static_cast<size_t>(checked_product({static_cast<int64_t>(n), d}, what)));
      const bool half = w.kind.dtype == DType::f16, swap = w.kind.big_endian;
      for (int64_t h = w.h0; h < w.h1; ++h) {
        const hsize_t start[3] = {static_cast<hsize_t>(h), static_cast<hsize_t>(w.t0), 0};
        check_status(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr),
                     what + ": bad selection");
        check_status(H5Dread(ds, ftype, mspace, fspace, H5P_DEFAULT, raw.data()), what + ": read failed");
        float* dst = out.row(h - w.h0, 0);
        const int64_t m = static_cast<int64_t>(raw.size());
#pragma omp parallel for schedule(static) if (m > (1 << 16))
        for (int64_t i = 0; i < m; ++i) {
          uint16_t b = raw[static_cast<size_t>(i)];
          if (swap) b = static_cast<uint16_t>((b >> 8) | (b << 8));
          dst[i] = half ? half_to_float(b) : bf16_to_float(b);
        }
      }
    }
  }
  const float* p = out.data();
  const int64_t m = out.size();
  int64_t a = 0, b = 0;
#pragma omp parallel for reduction(+ : a, b) schedule(static) if (m > (1 << 16))
  for (int64_t i = 0; i < m; ++i) {
    if (std::isnan(p[i])) ++a;
    else if (std::isinf(p[i])) ++b;
  }
  nan += a;
  inf += b;
}

// The window chunk by chunk (see "Direct chunk reads" above): each chunk's stored bytes are
// taken under the HDF5 lock, then checked, decoded and converted outside it, in parallel; a
// chunk that does not decode exactly as expected is read again through H5Dread, in chunk order
// after the others, so the first error is the one H5Dread would give. Scratch: two chunk
// buffers per thread (at most 256 MiB in all). Returns false, having read nothing, when the
// dataset's layout or filters are not ones decode_chunk handles.
bool StoreReader::Impl::read_direct(const Window& w, Tensor3& out, int64_t& nan, int64_t& inf) const {
  const std::string& what = w.what;
  // HDF5 objects are opened, used and closed only under the lock.
  struct Objects {
    Handle ds, ftype;
    ~Objects() {
      H5Lock lock;
      ftype.reset();
      ds.reset();
    }
  } obj;
  std::optional<DirectPlan> plan;
  {
    H5Lock lock;
    const hid_t dh = H5Dopen2(file, w.dpath.c_str(), H5P_DEFAULT);
    if (dh < 0) throw Error(what + ": cannot open" + h5_detail());
    obj.ds = Handle(dh, H5Dclose);
    obj.ftype = h5type(check_id(H5Dget_type(obj.ds), what + ": cannot read type"));
    plan = direct_plan(obj.ds, obj.ftype, w.kind);
    H5Eclear2(H5E_DEFAULT);
  }
  if (!plan) return false;
  const DirectPlan& P = *plan;
  const hid_t ds = obj.ds;
  const int64_t d = meta.head_dim, c0 = static_cast<int64_t>(P.chunk[0]), c1 = static_cast<int64_t>(P.chunk[1]),
                c2 = static_cast<int64_t>(P.chunk[2]);
  const int64_t hc0 = w.h0 / c0, nhc = (w.h1 - 1) / c0 + 1 - hc0;
  const int64_t tc0 = w.t0 / c1, ntc = (w.t1 - 1) / c1 + 1 - tc0;
  const int64_t ndc = (d - 1) / c2 + 1;
  const int64_t nchunks = nhc * ntc * ndc;
  struct Box {
    int64_t ha, hb, ta, tb, da, db;  // the chunk's part of the window (dataset coordinates)
    hsize_t origin[3];               // the chunk's first element
  };
  auto box = [&](int64_t k) {
    const int64_t hc = hc0 + k / (ntc * ndc), tc = tc0 + (k / ndc) % ntc, dc = k % ndc;
    Box b;
    b.ha = std::max(w.h0, hc * c0), b.hb = std::min(w.h1, (hc + 1) * c0);
    b.ta = std::max(w.t0, tc * c1), b.tb = std::min(w.t1, (tc + 1) * c1);
    b.da = dc * c2, b.db = std::min(d, (dc + 1) * c2);
    b.origin[0] = static_cast<hsize_t>(hc * c0), b.origin[1] = static_cast<hsize_t>(tc * c1),
    b.origin[2] = static_cast<hsize_t>(dc * c2);
    return b;
  };
  // Values of a box from a decoded chunk (c0 x c1 x c2 values, file byte order) into out.
  auto place = [&](const Box& b, const uint8_t* chunk, int64_t& bad_nan, int64_t& bad_inf) {
    const int64_t ct = b.tb - b.ta, cd = b.db - b.da;
    for (int64_t h = b.ha; h < b.hb; ++h) {
      const int64_t first = ((h - static_cast<int64_t>(b.origin[0])) * c1 + (b.ta - static_cast<int64_t>(b.origin[1]))) * c2 +
                            (b.da - static_cast<int64_t>(b.origin[2]));
      if (cd == c2 && cd == d) {  // whole rows on both sides: one run per head
        convert_values(w.kind, chunk + first * static_cast<int64_t>(P.elem), out.row(h - w.h0, b.ta - w.t0), ct * d,
                       bad_nan, bad_inf);
        continue;
      }
      for (int64_t t = 0; t < ct; ++t)
        convert_values(w.kind, chunk + (first + t * c2) * static_cast<int64_t>(P.elem),
                       out.row(h - w.h0, b.ta - w.t0 + t) + b.da, cd, bad_nan, bad_inf);
    }
  };

  std::vector<uint8_t> redo(static_cast<size_t>(nchunks), 0);
  const int64_t scratch_limit = int64_t{256} << 20;
  const int64_t per_thread = 2 * static_cast<int64_t>(P.capacity);
  int threads = static_cast<int>(std::min<int64_t>({omp_get_max_threads(), nchunks, std::max<int64_t>(1, scratch_limit / per_thread)}));
  if (h5_lock_depth() > 0) threads = 1;  // our caller holds the lock: workers could never take it
  int64_t sum_nan = 0, sum_inf = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sum_nan, sum_inf)
  {
    std::unique_ptr<uint8_t[]> a, b;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < nchunks; ++k) {
      try {
        if (!a) {
          a.reset(new uint8_t[P.capacity]);
          b.reset(new uint8_t[P.capacity]);
        }
        const Box bx = box(k);
        hsize_t stored = 0;
        uint32_t mask = 0;
        bool got = false;
        {
          H5Lock lock;
          if (H5Dget_chunk_storage_size(ds, bx.origin, &stored) >= 0 && stored > 0 && stored <= P.capacity)
            got = H5Dread_chunk(ds, H5P_DEFAULT, bx.origin, &mask, a.get()) >= 0;
          H5Eclear2(H5E_DEFAULT);
        }
        const uint8_t* chunk = got ? decode_chunk(P, mask, a.get(), b.get(), static_cast<size_t>(stored)) : nullptr;
        if (chunk) place(bx, chunk, sum_nan, sum_inf);
        else redo[static_cast<size_t>(k)] = 1;
      } catch (...) {  // e.g. no memory for the scratch: H5Dread's turn (outside the parallel region)
        redo[static_cast<size_t>(k)] = 1;
      }
    }
  }
  nan += sum_nan;
  inf += sum_inf;

  // The chunks left, through H5Dread: HDF5's values, or HDF5's error.
  const int64_t redone = std::count(redo.begin(), redo.end(), uint8_t{1});
  stats.direct_chunks += nchunks - redone;
  stats.h5dread_chunks += redone;
  for (int64_t k = 0; k < nchunks; ++k) {
    if (!redo[static_cast<size_t>(k)]) continue;
    const Box bx = box(k);
    const hsize_t start[3] = {static_cast<hsize_t>(bx.ha), static_cast<hsize_t>(bx.ta), static_cast<hsize_t>(bx.da)};
    const hsize_t count[3] = {static_cast<hsize_t>(bx.hb - bx.ha), static_cast<hsize_t>(bx.tb - bx.ta),
                              static_cast<hsize_t>(bx.db - bx.da)};
    const bool f32 = w.kind.dtype == DType::f32;
    std::vector<uint8_t> raw(static_cast<size_t>(count[0] * count[1] * count[2]) * P.elem);
    {
      H5Lock lock;
      Handle fspace = h5space(check_id(H5Dget_space(ds), what + ": cannot read dataspace"));
      check_status(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr), what + ": bad selection");
      Handle mspace = h5space(H5Screate_simple(3, count, nullptr));
      check_status(H5Dread(ds, f32 ? H5T_NATIVE_FLOAT : hid_t(obj.ftype), mspace, fspace, H5P_DEFAULT, raw.data()),
                   what + ": read failed");
    }
    // 16-bit: the file's bits as they are; float32: already native.
    const FloatKind kind = f32 ? FloatKind{DType::f32, std::endian::native == std::endian::big} : w.kind;
    const int64_t cd = bx.db - bx.da;
    for (int64_t h = bx.ha; h < bx.hb; ++h)
      for (int64_t t = bx.ta; t < bx.tb; ++t)
        convert_values(kind, raw.data() + (((h - bx.ha) * (bx.tb - bx.ta) + (t - bx.ta)) * cd) * static_cast<int64_t>(P.elem),
                       out.row(h - w.h0, t - w.t0) + bx.da, cd, nan, inf);
  }
  return true;
}

namespace {
// libhdf5 1.10 trusts some metadata it cannot checksum (the global heap holding variable-length
// strings, in any file format; every structure in the pre-1.8 format h5py writes by default)
// and can crash (memcpy past a buffer, a wild pointer) on a corrupt byte there, before any
// error reaches us. So the whole open (attributes, layer scan, chunk index walk) first runs in
// a forked probe process: if libhdf5 crashes there, the store is refused with one line instead
// of the tool dying. The probe is skipped under MPI launchers (fork beside an MPI transport is
// not portable) and with PROXYATTN_NO_OPEN_PROBE=1.
bool open_probe_enabled() {
  for (const char* v : {"PROXYATTN_NO_OPEN_PROBE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (const char* e = std::getenv(v); e && *e && !(std::string(v) == "PROXYATTN_NO_OPEN_PROBE" && std::string(e) == "0"))
      return false;
  return true;
}

constexpr int kProbeOk = 0, kProbeError = 3;

// Called with the HDF5 lock held, so no other thread of ours is inside libhdf5 at fork().
template <class Open>
void probe_open(const std::string& path, Open&& open) {
  const pid_t pid = ::fork();
  if (pid < 0) return;  // cannot fork: open without the probe
  if (pid == 0) {
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::signal(sig, SIG_DFL);  // never the parent's cleanup
    const int devnull = ::open("/dev/null", O_WRONLY);
    if (devnull >= 0) ::dup2(devnull, 2);  // a sanitizer's report of the crash is the parent's to give
    int code = kProbeOk;
    try {
      open();
    } catch (...) {
      code = kProbeError;  // the parent will find the same error itself
    }
    ::_exit(code);
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(st) && (WEXITSTATUS(st) == kProbeOk || WEXITSTATUS(st) == kProbeError)) return;
  const std::string how = WIFSIGNALED(st) ? "signal " + std::to_string(WTERMSIG(st)) + " (" + strsignal(WTERMSIG(st)) + ")"
                                          : "exit code " + std::to_string(WIFEXITED(st) ? WEXITSTATUS(st) : -1);
  throw Error(path + ": corrupt HDF5 metadata: libhdf5 " + std::string(H5_VERS_INFO).substr(22) +
              " crashed reading it (" + how + " in the open probe); the store cannot be read safely");
}
}  // namespace

StoreReader::StoreReader(const std::string& path, ReadOptions opts) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  impl_->opts = opts;
  H5Lock lock;
  if (open_probe_enabled()) {
    std::error_code ec;
    if (fs::is_regular_file(path, ec))
      probe_open(path, [&] {
        Impl probe;
        probe.path = path;
        probe.opts = opts;
        probe.open_file();
        probe.read_meta();
        probe.scan_layers();
      });
  }
  impl_->open_file();
  impl_->read_meta();
  impl_->scan_layers();
}

StoreReader::~StoreReader() {
  if (impl_) {
    H5Lock lock;
    impl_.reset();
  }
}
StoreReader::StoreReader(StoreReader&&) noexcept = default;
StoreReader& StoreReader::operator=(StoreReader&& o) noexcept {
  if (this != &o) {
    H5Lock lock;
    impl_ = std::move(o.impl_);
  }
  return *this;
}

const std::string& StoreReader::path() const { return impl_->path; }
const StoreMeta& StoreReader::meta() const { return impl_->meta; }
const std::vector<int>& StoreReader::layers() const { return impl_->layers; }
bool StoreReader::has_v(int layer) const { return impl_->layer(layer).ds[2].present; }
bool StoreReader::has_tokens() const { return impl_->has_tokens; }

DType StoreReader::dataset_dtype(int layer, Tensor which) const {
  const auto& di = impl_->layer(layer).ds[static_cast<int>(which)];
  if (!di.present) throw Error(impl_->ctx(impl_->ds_path(layer, which)) + ": missing dataset");
  return di.kind.dtype;
}

Tensor3 StoreReader::read(int layer, Tensor which, int64_t h0, int64_t h1, int64_t t0, int64_t t1) const {
  return impl_->read_window(layer, which, h0, h1, t0, t1);
}

LayerData StoreReader::read_layer(int layer, bool with_v) const {
  const auto& m = impl_->meta;
  {
    const std::string what = impl_->ctx(impl_->layer(layer).group);
    const int64_t per_head = checked_product({m.seq_len, m.head_dim, int64_t{sizeof(float)}}, what);
    const int64_t heads = m.num_q_heads + int64_t{m.num_kv_heads} * (with_v && has_v(layer) ? 2 : 1);
    require_fits(checked_mul(per_head, heads, what), what + ": reading the layer");
  }
  LayerData out;
  out.layer = layer;
  out.q = read(layer, Tensor::q, 0, m.num_q_heads, 0, m.seq_len);
  out.k = read(layer, Tensor::k, 0, m.num_kv_heads, 0, m.seq_len);
  if (with_v && has_v(layer)) out.v = read(layer, Tensor::v, 0, m.num_kv_heads, 0, m.seq_len);
  return out;
}

std::vector<int32_t> StoreReader::tokens() const {
  const std::string what = impl_->ctx("/tokens");
  if (!impl_->has_tokens) throw Error(what + ": missing dataset");
  require_fits(checked_mul(impl_->meta.seq_len, 4, what), what);
  std::vector<int32_t> out(static_cast<size_t>(impl_->meta.seq_len));
  H5Lock lock;
  const hid_t d = H5Dopen2(impl_->file, "tokens", H5P_DEFAULT);
  if (d < 0) throw Error(what + ": cannot open" + h5_detail());
  Handle ds(d, H5Dclose);
  check_status(H5Dread(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), what + ": read failed");
  return out;
}

// =============================================================================================
// Writer

struct StoreWriter::Impl {
  std::string path, tmp;
  StoreMeta meta;
  WriteOptions opts;
  Handle file, layers_group;
  std::vector<bool> written;
  bool committed = false;

  std::string ctx(const std::string& obj) const { return path + ": " + obj; }
  void write_dataset(hid_t group, const std::string& gpath, Tensor t, ConstView x);
};

namespace {
void validate_write_meta(const StoreMeta& m, const WriteOptions& o, const std::string& path) {
  auto pos = [&](const char* field, int64_t v) {
    if (v <= 0) throw Error(path + ": cannot write store: " + field + " must be positive, got " + std::to_string(v));
  };
  pos("num_layers", m.num_layers);
  pos("num_q_heads", m.num_q_heads);
  pos("num_kv_heads", m.num_kv_heads);
  pos("head_dim", m.head_dim);
  pos("seq_len", m.seq_len);
  if (m.num_q_heads % m.num_kv_heads != 0)
    throw Error(path + ": cannot write store: num_q_heads=" + std::to_string(m.num_q_heads) +
                " is not a multiple of num_kv_heads=" + std::to_string(m.num_kv_heads));
  if (!(m.rope_theta > 0) || !std::isfinite(m.rope_theta))
    throw Error(path + ": cannot write store: rope_theta must be a positive number");
  if (o.dtype != DType::f16 && o.dtype != DType::f32)
    throw Error(path + ": cannot write store: dtype " + std::string(dtype_name(o.dtype)) +
                " not supported (float16 or float32)");
  if (o.chunk_tokens <= 0) throw Error(path + ": cannot write store: chunk_tokens must be positive");
  if (m.needle && (m.needle->position < 0 || m.needle->position >= m.seq_len))
    throw Error(path + ": cannot write store: needle position outside [0, seq_len)");
}
}  // namespace

StoreWriter::StoreWriter(const std::string& path, const StoreMeta& meta, WriteOptions opts)
    : impl_(std::make_unique<Impl>()) {
  auto& I = *impl_;
  I.path = path;
  I.meta = meta;
  I.meta.dtype = opts.dtype;  // the attribute describes the datasets as written
  if (I.meta.creator.empty()) I.meta.creator = "proxyattn " + version();
  I.opts = opts;
  validate_write_meta(I.meta, opts, path);
  require_writable_parent(path);
  require_output_file_target(path);
  I.tmp = temp_path_for(path);
  I.written.assign(static_cast<size_t>(meta.num_layers), false);

  H5Lock lock;
  if (opts.gzip && H5Zfilter_avail(H5Z_FILTER_DEFLATE) <= 0)
    throw Error(path + ": gzip requested but this HDF5 has no deflate filter");
  // The newest file format (metadata checksums on every object header, B-tree and heap).
  Handle fapl = h5plist(H5Pcreate(H5P_FILE_ACCESS));
  check_status(H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST), path + ": cannot set the file format");
  register_temp_path(I.tmp);
  const hid_t f = H5Fcreate(I.tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
  if (f < 0) throw Error(path + ": cannot create " + I.tmp + h5_detail());
  I.file = Handle(f, H5Fclose);
  const StoreMeta& m = I.meta;
  const std::string& c = path;
  write_attr_str(I.file, "model", m.model, c);
  write_attr_str(I.file, "source", m.source, c);
  write_attr_int(I.file, "num_layers", m.num_layers, c);
  write_attr_int(I.file, "num_q_heads", m.num_q_heads, c);
  write_attr_int(I.file, "num_kv_heads", m.num_kv_heads, c);
  write_attr_int(I.file, "head_dim", m.head_dim, c);
  write_attr_int(I.file, "seq_len", m.seq_len, c);
  write_attr_double(I.file, "rope_theta", m.rope_theta, c);
  write_attr_bool(I.file, "rope_applied", m.rope_applied, c);
  write_attr_str(I.file, "dtype", std::string(dtype_name(m.dtype)), c);
  write_attr_str(I.file, "prompt_sha256", m.prompt_sha256, c);
  write_attr_str(I.file, "creator", m.creator, c);
  I.layers_group = Handle(check_id(H5Gcreate2(I.file, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                                   I.ctx("/layers") + ": cannot create group"),
                          H5Gclose);
  if (m.needle) {
    Handle g(check_id(H5Gcreate2(I.file, "needle", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                      I.ctx("/needle") + ": cannot create group"),
             H5Gclose);
    write_attr_int(g, "position", m.needle->position, I.ctx("/needle"));
    write_attr_str(g, "text", m.needle->text, I.ctx("/needle"));
  }
}

StoreWriter::~StoreWriter() {
  if (!impl_) return;
  H5Lock lock;
  impl_->layers_group.reset();
  impl_->file.reset();
  if (!impl_->committed && !impl_->tmp.empty()) {
    std::error_code ec;
    fs::remove(impl_->tmp, ec);
  }
  if (!impl_->tmp.empty()) unregister_temp_path(impl_->tmp);
}

void StoreWriter::Impl::write_dataset(hid_t group, const std::string& gpath, Tensor t, ConstView x) {
  const std::string name(tensor_name(t));
  const std::string what = ctx(gpath + "/" + name);
  const int64_t H = x.heads, N = x.tokens, d = x.dim;
  const hsize_t dims[3] = {static_cast<hsize_t>(H), static_cast<hsize_t>(N), static_cast<hsize_t>(d)};
  const hsize_t chunk[3] = {1, static_cast<hsize_t>(std::min<int64_t>(opts.chunk_tokens, N)),
                            static_cast<hsize_t>(d)};
  Handle fspace = h5space(H5Screate_simple(3, dims, nullptr));
  Handle dcpl = h5plist(H5Pcreate(H5P_DATASET_CREATE));
  check_status(H5Pset_chunk(dcpl, 3, chunk), what + ": cannot set chunking");
  if (opts.gzip) {
    check_status(H5Pset_shuffle(dcpl), what + ": cannot set shuffle");
    check_status(H5Pset_deflate(dcpl, 4), what + ": cannot set gzip");
  }
  check_status(H5Pset_fletcher32(dcpl), what + ": cannot set Fletcher-32");
  const bool half = opts.dtype == DType::f16;
  Handle ftype = half ? make_half_type() : h5type(H5Tcopy(H5T_IEEE_F32LE));
  Handle ds(check_id(H5Dcreate2(group, name.c_str(), ftype, fspace, H5P_DEFAULT, dcpl, H5P_DEFAULT),
                     what + ": cannot create dataset"),
            H5Dclose);
  // One head at a time: bounded scratch, and views with any strides are accepted.
  const hsize_t count[3] = {1, static_cast<hsize_t>(N), static_cast<hsize_t>(d)};
  Handle mspace = h5space(H5Screate_simple(3, count, nullptr));
  std::vector<uint16_t> h16(half ? static_cast<size_t>(N * d) : 0);
  std::vector<float> h32(half ? 0 : static_cast<size_t>(N * d));
  for (int64_t h = 0; h < H; ++h) {
#pragma omp parallel for schedule(static) if (N * d > (1 << 16))
    for (int64_t n = 0; n < N; ++n) {
      const float* src = x.row(h, n);
      if (half)
        for (int64_t c = 0; c < d; ++c) h16[static_cast<size_t>(n * d + c)] = float_to_half(src[c]);
      else
        std::memcpy(h32.data() + n * d, src, static_cast<size_t>(d) * sizeof(float));
    }
    const hsize_t start[3] = {static_cast<hsize_t>(h), 0, 0};
    check_status(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr),
                 what + ": bad selection");
    const herr_t st = half ? H5Dwrite(ds, ftype, mspace, fspace, H5P_DEFAULT, h16.data())
                           : H5Dwrite(ds, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, h32.data());
    check_status(st, what + ": write failed (disk full?)");
  }
}

void StoreWriter::write_layer(int layer, ConstView q, ConstView k, const ConstView* v) {
  auto& I = *impl_;
  const StoreMeta& m = I.meta;
  if (I.committed) throw Error(I.path + ": write_layer after commit");
  if (layer < 0 || layer >= m.num_layers)
    throw Error(I.path + ": layer " + std::to_string(layer) + " outside [0, num_layers=" +
                std::to_string(m.num_layers) + ")");
  if (I.written[static_cast<size_t>(layer)])
    throw Error(I.path + ": layer " + std::to_string(layer) + " written twice");
  const std::string gpath = "/layers/" + layer_group_name(layer, m.num_layers);
  auto check = [&](ConstView x, Tensor t, int64_t H) {
    const std::string what = I.ctx(gpath + "/" + std::string(tensor_name(t)));
    if (x.data == nullptr && !(x.heads == 0 || x.tokens == 0 || x.dim == 0))
      throw Error(what + ": null data");
    if (x.heads != H || x.tokens != m.seq_len || x.dim != m.head_dim)
      throw Error(what + ": shape [" + std::to_string(x.heads) + ", " + std::to_string(x.tokens) + ", " +
                  std::to_string(x.dim) + "] disagrees with the store (expected [" + std::to_string(H) + ", " +
                  std::to_string(m.seq_len) + ", " + std::to_string(m.head_dim) + "])");
  };
  check(q, Tensor::q, m.num_q_heads);
  check(k, Tensor::k, m.num_kv_heads);
  if (v) check(*v, Tensor::v, m.num_kv_heads);

  H5Lock lock;
  Handle g(check_id(H5Gcreate2(I.file, gpath.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                    I.ctx(gpath) + ": cannot create group"),
           H5Gclose);
  I.write_dataset(g, gpath, Tensor::q, q);
  I.write_dataset(g, gpath, Tensor::k, k);
  if (v) I.write_dataset(g, gpath, Tensor::v, *v);
  I.written[static_cast<size_t>(layer)] = true;
}

void StoreWriter::write_tokens(const std::vector<int32_t>& tokens) {
  auto& I = *impl_;
  const std::string what = I.ctx("/tokens");
  if (I.committed) throw Error(what + ": write after commit");
  if (static_cast<int64_t>(tokens.size()) != I.meta.seq_len)
    throw Error(what + ": " + std::to_string(tokens.size()) + " tokens != seq_len=" + std::to_string(I.meta.seq_len));
  H5Lock lock;
  if (link_exists(I.file, "tokens")) throw Error(what + ": written twice");
  const hsize_t n = tokens.size();
  Handle sp = h5space(H5Screate_simple(1, &n, nullptr));
  Handle dcpl = h5plist(H5Pcreate(H5P_DATASET_CREATE));
  const hsize_t chunk = std::min<hsize_t>(n, 65536);
  check_status(H5Pset_chunk(dcpl, 1, &chunk), what + ": cannot set chunking");
  check_status(H5Pset_fletcher32(dcpl), what + ": cannot set Fletcher-32");
  Handle ds(check_id(H5Dcreate2(I.file, "tokens", H5T_STD_I32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT),
                     what + ": cannot create dataset"),
            H5Dclose);
  check_status(H5Dwrite(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, tokens.data()),
               what + ": write failed");
}

void StoreWriter::commit() {
  auto& I = *impl_;
  if (I.committed) return;
  if (std::none_of(I.written.begin(), I.written.end(), [](bool b) { return b; }))
    throw Error(I.path + ": no layers written; refusing to commit an empty store");
  {
    H5Lock lock;
    I.layers_group.reset();
    if (!I.file.close()) throw Error(I.path + ": closing the HDF5 file failed (disk full?)" + h5_detail());
  }
  std::error_code ec;
  fs::rename(I.tmp, I.path, ec);
  if (ec) throw Error(I.path + ": cannot rename temporary file " + I.tmp + ": " + ec.message());
  I.committed = true;
}

// =============================================================================================
// Per-layer attention attributes (/layers/NN: attention = "global" | "sliding", window = W)

nlohmann::json store_attributes_json(const StoreMeta& m) {
  nlohmann::json a;
  a["model"] = m.model;
  a["source"] = m.source;
  a["num_layers"] = m.num_layers;
  a["num_q_heads"] = m.num_q_heads;
  a["num_kv_heads"] = m.num_kv_heads;
  a["head_dim"] = m.head_dim;
  a["seq_len"] = m.seq_len;
  a["rope_theta"] = m.rope_theta;
  a["rope_applied"] = m.rope_applied;
  a["dtype"] = std::string(dtype_name(m.dtype));
  a["prompt_sha256"] = m.prompt_sha256;
  a["creator"] = m.creator;
  return a;
}

std::string_view attention_kind_name(AttentionKind k) {
  return k == AttentionKind::sliding ? "sliding" : "global";
}

namespace {
LayerAttention read_layer_attention(hid_t group, const std::string& ctx) {
  AttrReader ar{group, ctx};
  LayerAttention att;
  const bool has_window = ar.exists("window");
  if (!ar.exists("attention")) {
    if (has_window)
      throw Error(ar.where("window") + ": present without attribute attention (\"sliding\" expected)");
    return att;  // stores from before the attribute: full causal
  }
  const std::string kind = ar.string("attention");
  if (kind == "global") {
    if (has_window) {
      const int64_t w = ar.integer("window");
      if (w != 0)
        throw Error(ar.where("window") + ": " + std::to_string(w) +
                    " on a global layer (only attention = \"sliding\" has a window)");
    }
    return att;
  }
  if (kind != "sliding")
    throw Error(ar.where("attention") + ": expected \"global\" or \"sliding\", found \"" + kind + "\"");
  if (!has_window) throw Error(ar.where("window") + ": missing (attention = \"sliding\" needs a window)");
  const int64_t w = ar.integer("window");
  if (w < 1) throw Error(ar.where("window") + ": must be a positive number of tokens, found " + std::to_string(w));
  att.kind = AttentionKind::sliding;
  att.window = w;
  return att;
}
}  // namespace

const LayerAttention& StoreReader::attention(int layer) const { return impl_->layer(layer).attention; }

ReadStats StoreReader::read_stats() const {
  return {impl_->stats.direct_chunks.load(), impl_->stats.h5dread_chunks.load(), impl_->stats.h5dread_windows.load()};
}

void StoreWriter::set_attention(int layer, const LayerAttention& att) {
  auto& I = *impl_;
  if (I.committed) throw Error(I.path + ": set_attention after commit");
  if (layer < 0 || layer >= I.meta.num_layers || !I.written[static_cast<size_t>(layer)])
    throw Error(I.path + ": set_attention: layer " + std::to_string(layer) + " has not been written");
  const std::string gpath = "/layers/" + layer_group_name(layer, I.meta.num_layers);
  if (att.sliding() && att.window < 1)
    throw Error(I.ctx(gpath) + ": sliding attention needs a window >= 1, got " + std::to_string(att.window));
  if (!att.sliding() && att.window != 0)
    throw Error(I.ctx(gpath) + ": a global layer has no window, got " + std::to_string(att.window));
  H5Lock lock;
  Handle g(check_id(H5Gopen2(I.file, gpath.c_str(), H5P_DEFAULT), I.ctx(gpath) + ": cannot open group"),
           H5Gclose);
  for (const char* name : {"attention", "window"})
    if (H5Aexists(g, name) > 0)
      check_status(H5Adelete(g, name), I.ctx(gpath) + ": cannot replace attribute " + name);
  write_attr_str(g, "attention", std::string(attention_kind_name(att.kind)), I.ctx(gpath));
  if (att.sliding()) write_attr_int(g, "window", att.window, I.ctx(gpath));
}

}  // namespace proxyattn
