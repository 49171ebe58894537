// Random density masks, the .pxm mask file format and the export manifest.
#include "masks.hpp"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <vector>

#include <fmt/format.h>

#include "proxyattn/checked.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"

namespace proxyattn::bench {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'P', 'X', 'M', 'A', 'S', 'K', '0', '1'};

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform integer in [0, bound) (Lemire's multiply-shift; the bias is below 2^-40 for our sizes).
uint64_t below(uint64_t& state, uint64_t bound) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(splitmix64(state)) * bound) >> 64);
}

template <class T>
void put(std::string& buf, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  buf.append(b, sizeof(T));
}

template <class T>
T get(const std::string& buf, size_t& off) {
  T v;
  std::memcpy(&v, buf.data() + off, sizeof(T));
  off += sizeof(T);
  return v;
}

std::string file_stem(const std::string& method, int64_t n) {
  std::string s = method;
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '_') c = '_';
  return fmt::format("mask_{}_N{}", s, n);
}

}  // namespace

BlockMask random_density_mask(int heads, int64_t seq_len, int block, double density, uint64_t seed) {
  if (!(density > 0.0 && density <= 1.0))
    throw Error(fmt::format("random mask: density {} is outside (0, 1]", density));
  if (heads < 1) throw Error("random mask: heads must be >= 1");
  const int nb = num_blocks_for(seq_len, block);
  const int64_t total = int64_t{nb} * (nb + 1) / 2;
  const int64_t pool = total - nb;  // off-diagonal causal blocks
  const int64_t target = std::clamp<int64_t>(std::llround(density * static_cast<double>(total)), nb, total);
  const int64_t pick = target - nb;
  if (int64_t{heads} * target > int64_t{2147483647})
    throw Error(fmt::format("random mask: {} blocks overflow the int32 CSR indices", int64_t{heads} * target));

  std::vector<int32_t> indptr(static_cast<size_t>(heads) * nb + 1, 0);
  std::vector<int32_t> indices(static_cast<size_t>(heads) * target);
  // Per-thread scratch may fail to allocate: the first exception is kept and rethrown after the
  // region (none may leave an OpenMP region).
  require_fits(checked_mul(checked_add(pool * 5, 0, "random mask"), omp_get_max_threads(), "random mask"),
               fmt::format("random mask: {} x {} blocks, scratch", heads, nb));
  std::exception_ptr first_error;
#pragma omp parallel for schedule(dynamic, 1)
  for (int h = 0; h < heads; ++h) try {
    // Partial Fisher-Yates over the off-diagonal pool: the first `pick` entries are the chosen.
    std::vector<uint8_t> chosen(static_cast<size_t>(pool), pick == pool ? 1 : 0);
    if (pick > 0 && pick < pool) {
      uint64_t st = seed * 0x100000001B3ull ^ (static_cast<uint64_t>(h) + 1) * 0xD6E8FEB86659FD93ull;
      std::vector<int32_t> perm(static_cast<size_t>(pool));
      std::iota(perm.begin(), perm.end(), 0);
      for (int64_t t = 0; t < pick; ++t) {
        const int64_t r = t + static_cast<int64_t>(below(st, static_cast<uint64_t>(pool - t)));
        std::swap(perm[t], perm[r]);
        chosen[perm[t]] = 1;
      }
    }
    // Emit head h in CSR order; off-diagonal pool index of (i, j<i) is i (i - 1) / 2 + j.
    int32_t* out = indices.data() + static_cast<size_t>(h) * target;
    int32_t* ptr = indptr.data() + static_cast<size_t>(h) * nb;
    int64_t w = 0;
    for (int i = 0; i < nb; ++i) {
      ptr[i] = static_cast<int32_t>(w);  // relative to the head; shifted below
      const int64_t base = int64_t{i} * (i - 1) / 2;
      for (int j = 0; j < i; ++j)
        if (chosen[base + j]) out[w++] = j;
      out[w++] = i;
    }
  } catch (...) {
#pragma omp critical(proxyattn_mask_error)
    if (!first_error) first_error = std::current_exception();
  }
  if (first_error) std::rethrow_exception(first_error);
  // Heads hold exactly `target` blocks each, so the head offsets are h * target.
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) indptr[static_cast<size_t>(h) * nb + i] += static_cast<int32_t>(int64_t{h} * target);
  indptr.back() = static_cast<int32_t>(int64_t{heads} * target);
  return BlockMask(heads, seq_len, block, std::move(indptr), std::move(indices));
}

std::string encode_mask(const BlockMask& m) {
  std::string buf;
  buf.reserve(40 + 4 * (m.indptr().size() + m.indices().size()));
  buf.append(kMagic, 8);
  put<int32_t>(buf, m.heads());
  put<int32_t>(buf, m.block());
  put<int64_t>(buf, m.seq_len());
  put<int32_t>(buf, m.num_blocks());
  put<int32_t>(buf, 0);
  put<int64_t>(buf, static_cast<int64_t>(m.indices().size()));
  buf.append(reinterpret_cast<const char*>(m.indptr().data()), 4 * m.indptr().size());
  buf.append(reinterpret_cast<const char*>(m.indices().data()), 4 * m.indices().size());
  return buf;
}

void write_mask_file(const std::string& path, const BlockMask& m) {
  const std::string buf = encode_mask(m);
  AtomicFile f(path, /*binary=*/true);
  f.stream().write(buf.data(), static_cast<std::streamsize>(buf.size()));
  f.commit();
}

BlockMask read_mask_file(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw Error(path + ": no such mask file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open for reading");
  const std::string buf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode_mask(buf, path);
}

BlockMask decode_mask(const std::string& buf, const std::string& path) {
  if (buf.size() < 40 || std::memcmp(buf.data(), kMagic, 8) != 0)
    throw Error(path + ": not a proxyattn mask file (magic PXMASK01 missing)");
  size_t off = 8;
  const int32_t heads = get<int32_t>(buf, off);
  const int32_t block = get<int32_t>(buf, off);
  const int64_t n = get<int64_t>(buf, off);
  const int32_t nb = get<int32_t>(buf, off);
  (void)get<int32_t>(buf, off);
  const int64_t nnz = get<int64_t>(buf, off);
  if (heads < 1 || n < 1 || nb < 1 || nnz < 0 || heads > (1 << 20))
    throw Error(fmt::format("{}: bad header (heads {}, seq_len {}, num_blocks {}, nnz {})", path, heads, n, nb, nnz));
  try {
    validate_block_size(block);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  if (num_blocks_for(n, block) != nb)
    throw Error(fmt::format("{}: num_blocks {} does not match seq_len {} / block {}", path, nb, n, block));
  const uint64_t rows = static_cast<uint64_t>(heads) * nb + 1;
  const uint64_t want = 40 + 4 * (rows + static_cast<uint64_t>(nnz));
  if (buf.size() != want)
    throw Error(fmt::format("{}: size {} bytes, the header implies {}", path, buf.size(), want));
  std::vector<int32_t> indptr(rows), indices(static_cast<size_t>(nnz));
  std::memcpy(indptr.data(), buf.data() + 40, 4 * rows);
  std::memcpy(indices.data(), buf.data() + 40 + 4 * rows, 4 * static_cast<size_t>(nnz));
  if (indptr.front() != 0 || indptr.back() != nnz)
    throw Error(fmt::format("{}: indptr must run from 0 to nnz {}", path, nnz));
  for (size_t r = 0; r + 1 < rows; ++r)
    if (indptr[r + 1] < indptr[r]) throw Error(fmt::format("{}: indptr decreases at row {}", path, r));
  try {
    return BlockMask(heads, n, block, std::move(indptr), std::move(indices));
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

MaskExporter::MaskExporter(std::string dir) : dir_(std::move(dir)) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (!fs::is_directory(dir_, ec)) throw Error(dir_ + ": cannot create the mask export directory");
}

bool MaskExporter::has(const std::string& method, int64_t n) const {
  for (const auto& e : entries_)
    if (e["method"] == method && e["n"] == n) return true;
  return false;
}

std::string MaskExporter::add(const std::string& method, int64_t n, const BlockMask& mask,
                              const nlohmann::json& info) {
  const std::string name = file_stem(method, n) + ".pxm";
  const std::string path = (fs::path(dir_) / name).string();
  if (has(method, n)) return path;
  write_mask_file(path, mask);
  nlohmann::json e = info;
  e["file"] = name;
  e["method"] = method;
  e["n"] = n;
  e["heads"] = mask.heads();
  e["block"] = mask.block();
  e["num_blocks"] = mask.num_blocks();
  e["nnz"] = mask.selected();
  e["density"] = mask.density();
  e["element_density"] = mask.element_density();
  entries_.push_back(std::move(e));
  return path;
}

void MaskExporter::write() const {
  if (!enabled()) return;
  nlohmann::json j = {{"schema_version", 1}, {"format", "PXMASK01"}, {"masks", entries_}};
  write_file_atomic((fs::path(dir_) / "manifest.json").string(), j.dump(2) + "\n");
}

}  // namespace proxyattn::bench
