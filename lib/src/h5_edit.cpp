// Raw HDF5 edits for test fixtures (see h5_edit.hpp).
#include "proxyattn/h5_edit.hpp"

#include <hdf5.h>

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
               const std::vector<float>& data) {
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

}  // namespace proxyattn::h5edit
