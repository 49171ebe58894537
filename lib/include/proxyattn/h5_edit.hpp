#pragma once
// Raw edits of an existing HDF5 file, for building test fixtures (broken stores: a missing
// dataset, a wrong rank, attributes that disagree, ...) without linking HDF5 into the tests.
// Not part of the analysis API; every function throws Error naming the file and object.
#include <cstdint>
#include <string>
#include <vector>

namespace proxyattn::h5edit {

// Removes the link to a dataset or group (e.g. "/layers/00/k").
void remove_object(const std::string& file, const std::string& object);
// Removes attribute `name` of `object` ("/" for the root).
void remove_attr(const std::string& file, const std::string& object, const std::string& name);
// (Re)writes a scalar attribute, replacing any existing one of that name.
void set_attr_int(const std::string& file, const std::string& object, const std::string& name, int64_t v);
void set_attr_double(const std::string& file, const std::string& object, const std::string& name, double v);
// fixed_length: a fixed-length ASCII string (what h5py writes for numpy bytes) instead of
// variable-length UTF-8.
void set_attr_string(const std::string& file, const std::string& object, const std::string& name,
                     const std::string& v, bool fixed_length = false);
// (Re)writes a float32 dataset of any rank (dims), replacing an existing one.
void write_f32(const std::string& file, const std::string& dataset, const std::vector<uint64_t>& dims,
               const std::vector<float>& data);

}  // namespace proxyattn::h5edit
