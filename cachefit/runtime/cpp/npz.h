// .npy / .npz reading and writing for cachefit-run (NumPy's format, version 1.0-3.0; ZIP "stored" entries).
//
// Reads what np.save / np.savez write: dtypes f2 f4 f8 i1 i2 i4 i8 u1 u2 u4 u8 b1 in either byte order
// (converted to little-endian), C or Fortran order (converted to C order), and raw void V<n> arrays
// (as dtype "void<n>", e.g. ml_dtypes.bfloat16 arrays, which NumPy saves as |V2). ZIP64 entries (NumPy
// writes them) are read. Compressed entries (np.savez_compressed) are refused with a clear error.
// Writes .npy version 1.0 (little-endian, C order) inside an uncompressed .npz (no ZIP64: < 4 GiB).
#ifndef CACHEFIT_NPZ_H_
#define CACHEFIT_NPZ_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cachefit_runtime.h"

namespace cachefit {
namespace npz {

// One array of an .npy payload; `where` names the source in error messages.
HostTensor parse_npy(const uint8_t* data, std::size_t size, const std::string& where);
// The .npy file bytes (format 1.0) of a tensor. bfloat16 and float8 tensors are written as |V2 / |V1.
std::vector<uint8_t> format_npy(const HostTensor& tensor);

// Every array of an .npz file, in file order (name without ".npy").
std::vector<std::pair<std::string, HostTensor>> load_npz(const std::string& path);
// Writes the arrays, in the given order, to an uncompressed .npz file (replacing it).
void save_npz(const std::string& path, const std::vector<std::pair<std::string, const HostTensor*>>& arrays);

// CRC-32 (ISO 3309, as used by ZIP) of a buffer, continuing from `crc`.
uint32_t crc32(const uint8_t* data, std::size_t size, uint32_t crc = 0);

}  // namespace npz
}  // namespace cachefit

#endif  // CACHEFIT_NPZ_H_
