// Raw HDF5 edits for test fixtures (see h5_edit.hpp).
#include "proxyattn/h5_edit.hpp"

#include <hdf5.h>

#include <cstring>

#include "proxyattn/error.hpp"

namespace proxyattn::h5edit {

namespace {

struct File {
  hid_t id = -1;
  std::string path;
  explicit File(const std::string& p) : path(p) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    id = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    if (id < 0) fail("cannot open for editing");
  }
  ~File() {
    if (id >= 0) H5Fclose(id);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  [[noreturn]] void fail(const std::string& what) const {
    H5Eclear2(H5E_DEFAULT);
    throw Error(path + ": " + what);
  }
};

struct Obj {
  hid_t id = -1;
  Obj(const File& f, const std::string& object) {
    id = H5Oopen(f.id, object.c_str(), H5P_DEFAULT);
    if (id < 0) f.fail(object + ": cannot open object");
  }
  ~Obj() {
    if (id >= 0) H5Oclose(id);
  }
  Obj(const Obj&) = delete;
  Obj& operator=(const Obj&) = delete;
};

void set_attr(const std::string& file, const std::string& object, const std::string& name, hid_t ftype,
              hid_t mtype, const void* value) {
  File f(file);
  Obj o(f, object);
  if (H5Aexists(o.id, name.c_str()) > 0 && H5Adelete(o.id, name.c_str()) < 0)
    f.fail(object + ": cannot replace attribute " + name);
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(o.id, name.c_str(), ftype, sp, H5P_DEFAULT, H5P_DEFAULT);
  const herr_t st = a >= 0 ? H5Awrite(a, mtype, value) : -1;
  if (a >= 0) H5Aclose(a);
  H5Sclose(sp);
  if (st < 0) f.fail(object + ": cannot write attribute " + name);
}

}  // namespace

void remove_object(const std::string& file, const std::string& object) {
  File f(file);
  if (H5Ldelete(f.id, object.c_str(), H5P_DEFAULT) < 0) f.fail(object + ": cannot remove");
}

void remove_attr(const std::string& file, const std::string& object, const std::string& name) {
  File f(file);
  Obj o(f, object);
  if (H5Adelete(o.id, name.c_str()) < 0) f.fail(object + ": cannot remove attribute " + name);
}

void set_attr_int(const std::string& file, const std::string& object, const std::string& name, int64_t v) {
  set_attr(file, object, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v);
}

void set_attr_double(const std::string& file, const std::string& object, const std::string& name, double v) {
  set_attr(file, object, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v);
}

void set_attr_string(const std::string& file, const std::string& object, const std::string& name,
                     const std::string& v, bool fixed_length) {
  const hid_t t = H5Tcopy(H5T_C_S1);
  if (fixed_length) {
    H5Tset_size(t, v.empty() ? 1 : v.size());
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    std::string buf = v.empty() ? std::string(1, '\0') : v;
    try {
      set_attr(file, object, name, t, t, buf.data());
    } catch (...) {
      H5Tclose(t);
      throw;
    }
  } else {
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    const char* p = v.c_str();
    try {
      set_attr(file, object, name, t, t, &p);
    } catch (...) {
      H5Tclose(t);
      throw;
    }
  }
  H5Tclose(t);
}

void write_f32(const std::string& file, const std::string& dataset, const std::vector<uint64_t>& dims,
               std::span<const float> data) {
  File f(file);
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;
  if (n != data.size()) f.fail(dataset + ": data size does not match dims");
  if (H5Lexists(f.id, dataset.c_str(), H5P_DEFAULT) > 0 && H5Ldelete(f.id, dataset.c_str(), H5P_DEFAULT) < 0)
    f.fail(dataset + ": cannot replace");
  std::vector<hsize_t> hd(dims.begin(), dims.end());
  const hid_t sp = H5Screate_simple(static_cast<int>(hd.size()), hd.data(), nullptr);
  const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  // Like the stores we write: chunked (one chunk) with Fletcher-32, where the shape allows it.
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (!hd.empty() && n > 0 && n * sizeof(float) < (uint64_t{1} << 30)) {
    H5Pset_chunk(dcpl, static_cast<int>(hd.size()), hd.data());
    H5Pset_fletcher32(dcpl);
  }
  const hid_t ds = H5Dcreate2(f.id, dataset.c_str(), H5T_IEEE_F32LE, sp, lcpl, dcpl, H5P_DEFAULT);
  H5Pclose(dcpl);
  const herr_t st = ds >= 0 ? H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()) : -1;
  if (ds >= 0) H5Dclose(ds);
  H5Pclose(lcpl);
  H5Sclose(sp);
  if (st < 0) f.fail(dataset + ": cannot write");
}

void write_float(const std::string& file, const std::string& dataset, const std::vector<uint64_t>& dims,
                 std::span<const float> data, const DatasetSpec& spec) {
  File f(file);
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;
  if (n != data.size()) f.fail(dataset + ": data size does not match dims");
  if (!spec.chunk.empty() && spec.chunk.size() != dims.size()) f.fail(dataset + ": chunk rank differs");
  if (H5Lexists(f.id, dataset.c_str(), H5P_DEFAULT) > 0 && H5Ldelete(f.id, dataset.c_str(), H5P_DEFAULT) < 0)
    f.fail(dataset + ": cannot replace");
  const size_t elem = spec.dtype == DType::f32 ? 4 : 2;
  // The file type; memory type = file type, so the bytes below are written as they are.
  const hid_t t = H5Tcopy(H5T_IEEE_F32LE);
  if (spec.dtype == DType::f16) {
    H5Tset_fields(t, 15, 10, 5, 0, 10);
    H5Tset_size(t, 2);
    H5Tset_ebias(t, 15);
  } else if (spec.dtype == DType::bf16) {
    H5Tset_fields(t, 15, 7, 8, 0, 7);
    H5Tset_size(t, 2);
    H5Tset_ebias(t, 127);
  }
  if (spec.big_endian) H5Tset_order(t, H5T_ORDER_BE);
  std::vector<unsigned char> bytes(n * elem);
  for (uint64_t i = 0; i < n; ++i) {
    uint32_t bits;
    if (spec.dtype == DType::f32) {
      std::memcpy(&bits, &data[i], 4);
    } else {
      bits = spec.dtype == DType::f16 ? float_to_half(data[i]) : float_to_bf16(data[i]);
    }
    for (size_t b = 0; b < elem; ++b) {  // little-endian, or big-endian, whatever this machine is
      const unsigned char byte = static_cast<unsigned char>(bits >> (8 * b));
      bytes[i * elem + (spec.big_endian ? elem - 1 - b : b)] = byte;
    }
  }
  std::vector<hsize_t> hd(dims.begin(), dims.end());
  const hid_t sp = H5Screate_simple(static_cast<int>(hd.size()), hd.data(), nullptr);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (!spec.chunk.empty()) {
    std::vector<hsize_t> hc(spec.chunk.begin(), spec.chunk.end());
    H5Pset_chunk(dcpl, static_cast<int>(hc.size()), hc.data());
    for (int id : spec.filters) {
      if (id == H5Z_FILTER_DEFLATE) H5Pset_deflate(dcpl, 4);
      else if (id == H5Z_FILTER_SHUFFLE) H5Pset_shuffle(dcpl);
      else if (id == H5Z_FILTER_FLETCHER32) H5Pset_fletcher32(dcpl);
    }
  }
  const hid_t ds = H5Dcreate2(f.id, dataset.c_str(), t, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  const herr_t st = ds >= 0 ? H5Dwrite(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()) : -1;
  if (ds >= 0) H5Dclose(ds);
  H5Pclose(dcpl);
  H5Sclose(sp);
  H5Tclose(t);
  if (st < 0) f.fail(dataset + ": cannot write");
}

ChunkLocation chunk_location(const std::string& file, const std::string& dataset, uint64_t index) {
  File f(file);
  const hid_t ds = H5Dopen2(f.id, dataset.c_str(), H5P_DEFAULT);
  if (ds < 0) f.fail(dataset + ": cannot open");
  const hid_t sp = H5Dget_space(ds);
  hsize_t offset[8] = {}, size = 0;
  haddr_t addr = 0;
  unsigned mask = 0;
  const herr_t st = H5Dget_chunk_info(ds, sp, index, offset, &mask, &addr, &size);
  H5Sclose(sp);
  H5Dclose(ds);
  if (st < 0) f.fail(dataset + ": no chunk " + std::to_string(index));
  return {static_cast<uint64_t>(addr), static_cast<uint64_t>(size), mask};
}

void write_chunk_raw(const std::string& file, const std::string& dataset, const std::vector<uint64_t>& origin,
                     uint32_t filter_mask, const std::string& bytes) {
  File f(file);
  const hid_t ds = H5Dopen2(f.id, dataset.c_str(), H5P_DEFAULT);
  if (ds < 0) f.fail(dataset + ": cannot open");
  std::vector<hsize_t> o(origin.begin(), origin.end());
  const herr_t st = H5Dwrite_chunk(ds, H5P_DEFAULT, filter_mask, o.data(), bytes.size(), bytes.data());
  H5Dclose(ds);
  if (st < 0) f.fail(dataset + ": cannot write the chunk");
}

}  // namespace proxyattn::h5edit
