#pragma once
// Raw edits of an existing HDF5 file, for building test fixtures (broken stores: a missing
// dataset, a wrong rank, attributes that disagree, ...) without linking HDF5 into the tests.
// Not part of the analysis API; every function throws Error naming the file and object.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "proxyattn/dtype.hpp"

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
               std::span<const float> data);

// A float dataset stored as the store writer never writes it: float16, bfloat16 or float32 of
// either byte order, any chunk shape (empty: contiguous) and filters in any order (pipeline
// order: H5Z_FILTER_DEFLATE 1 (gzip level 4), H5Z_FILTER_SHUFFLE 2, H5Z_FILTER_FLETCHER32 3).
// `data` are rounded to the dtype (float_to_half / float_to_bf16) and written bit for bit.
struct DatasetSpec {
  DType dtype = DType::f16;
  bool big_endian = false;
  std::vector<uint64_t> chunk;
  std::vector<int> filters;
};
void write_float(const std::string& file, const std::string& dataset, const std::vector<uint64_t>& dims,
                 std::span<const float> data, const DatasetSpec& spec);

// Where chunk `index` (HDF5's chunk order) of a chunked dataset is stored: file offset and size.
struct ChunkLocation {
  uint64_t offset = 0, size = 0;
  uint32_t filter_mask = 0;  // bit i set: filter i was skipped when the chunk was written
};
ChunkLocation chunk_location(const std::string& file, const std::string& dataset, uint64_t index);

// Replaces the stored bytes of the chunk at element `origin` (H5Dwrite_chunk): `bytes` as
// they are, with `filter_mask` (bit i: filter i skipped) recorded for the chunk.
void write_chunk_raw(const std::string& file, const std::string& dataset, const std::vector<uint64_t>& origin,
                     uint32_t filter_mask, const std::string& bytes);

}  // namespace proxyattn::h5edit
