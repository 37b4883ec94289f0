// .npy / .npz reading and writing (see npz.h). Formats:
//   .npy: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
//   .zip: PKWARE APPNOTE.TXT 6.3 (local headers, central directory, end records, ZIP64 extra field)
#include "npz.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

namespace cachefit {
namespace npz {

namespace {

// Bytes from a damaged file may reach a message: keep printable ASCII and valid UTF-8, escape the rest.
std::string printable(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = len > 0 && i + len <= s.size() && (len > 1 || c >= 0x20 || c == '\n') && c != 0x7f;
    for (std::size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 0x2;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
      ++i;
    }
  }
  return out;
}

Error npz_error(const std::string& msg) { return Error(Error::Kind::kInput, printable(msg)); }

// ---------------------------------------------------------------------------------------------
// .npy header: a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }

class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& where) : s_(text), where_(where) {}

  void parse(std::string* descr, bool* fortran, std::vector<int64_t>* shape) {
    bool seen_descr = false, seen_fortran = false, seen_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') {
        ++pos_;
        break;
      }
      std::string key = string_literal();
      expect(':');
      skip_space();
      if (key == "descr") {
        if (peek() != '\'' && peek() != '"') {
          fail("the array has a structured dtype (descr " + s_.substr(pos_, 40) + "...); save plain arrays");
        }
        *descr = string_literal();
        seen_descr = true;
      } else if (key == "fortran_order") {
        *fortran = boolean();
        seen_fortran = true;
      } else if (key == "shape") {
        *shape = tuple();
        seen_shape = true;
      } else {
        fail("unexpected key '" + key + "' in the header");
      }
      skip_space();
      if (peek() == ',') {
        ++pos_;
      } else if (peek() != '}') {
        fail("expected ',' or '}' at offset " + std::to_string(pos_));
      }
    }
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters after the header dict");
    if (!seen_descr || !seen_fortran || !seen_shape) fail("the header lacks 'descr', 'fortran_order' or 'shape'");
  }

 private:
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void skip_space() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) fail(std::string("expected '") + c + "' at offset " + std::to_string(pos_));
    ++pos_;
  }
  std::string string_literal() {
    skip_space();
    char q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string at offset " + std::to_string(pos_));
    ++pos_;
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != q) {
      if (s_[pos_] == '\\') fail("escape sequences are not expected in the header");
      out += s_[pos_++];
    }
    if (pos_ >= s_.size()) fail("unterminated string in the header");
    ++pos_;
    return out;
  }
  bool boolean() {
    if (s_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return true;
    }
    if (s_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return false;
    }
    fail("fortran_order is neither True nor False");
  }
  std::vector<int64_t> tuple() {
    std::vector<int64_t> out;
    expect('(');
    while (true) {
      skip_space();
      if (peek() == ')') {
        ++pos_;
        return out;
      }
      if (!std::isdigit(static_cast<unsigned char>(peek()))) fail("the shape is not a tuple of non-negative integers");
      int64_t v = 0;
      while (std::isdigit(static_cast<unsigned char>(peek()))) {
        if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) fail("a shape dimension is too large");
        v = v * 10 + (s_[pos_++] - '0');
      }
      if (peek() == 'L') ++pos_;  // Python 2 long literal
      out.push_back(v);
      skip_space();
      if (peek() == ',') {
        ++pos_;
      } else if (peek() != ')') {
        fail("expected ',' or ')' in the shape");
      }
    }
  }
  [[noreturn]] void fail(const std::string& msg) const {
    throw npz_error(where_ + ": malformed .npy header: " + msg);
  }

  const std::string& s_;
  const std::string& where_;
  std::size_t pos_ = 0;
};

// descr ('<f4', '|b1', '>i8', '|V2') -> cachefit dtype name, item size and whether bytes must be swapped.
void decode_descr(const std::string& descr, const std::string& where, std::string* dtype, std::size_t* itemsize,
                  bool* swap) {
  auto unsupported = [&]() {
    return npz_error(where + ": arrays of NumPy dtype '" + descr +
                     "' are not supported (use float16/32/64, (u)int8-64 or bool)");
  };
  if (descr.size() < 3) throw unsupported();
  char order = descr[0];
  char kind = descr[1];
  std::string digits = descr.substr(2);
  if (digits.empty() || digits.size() > 4 || digits.find_first_not_of("0123456789") != std::string::npos) {
    throw unsupported();
  }
  std::size_t n = std::stoul(digits);
  if (order != '<' && order != '>' && order != '|' && order != '=') throw unsupported();
  *itemsize = n;
  *swap = (order == '>') && n > 1;
  if (kind == 'f' && (n == 2 || n == 4 || n == 8)) {
    *dtype = "float" + std::to_string(8 * n);
  } else if (kind == 'i' && (n == 1 || n == 2 || n == 4 || n == 8)) {
    *dtype = "int" + std::to_string(8 * n);
  } else if (kind == 'u' && (n == 1 || n == 2 || n == 4 || n == 8)) {
    *dtype = "uint" + std::to_string(8 * n);
  } else if (kind == 'b' && n == 1) {
    *dtype = "bool";
  } else if (kind == 'V' && n >= 1 && n <= 16) {
    *dtype = "void" + std::to_string(n);
    *swap = false;
  } else {
    throw unsupported();
  }
}

std::string encode_descr(const std::string& dtype, const std::string& where) {
  static const std::array<std::pair<const char*, const char*>, 15> kMap = {{
      {"float64", "<f8"}, {"float32", "<f4"}, {"float16", "<f2"}, {"int64", "<i8"}, {"int32", "<i4"},
      {"int16", "<i2"},   {"int8", "|i1"},    {"uint64", "<u8"},  {"uint32", "<u4"}, {"uint16", "<u2"},
      {"uint8", "|u1"},   {"bool", "|b1"},    {"bfloat16", "|V2"}, {"float8_e4m3fn", "|V1"}, {"float8_e5m2", "|V1"},
  }};
  for (const auto& [name, descr] : kMap) {
    if (dtype == name) return descr;
  }
  if (dtype.rfind("void", 0) == 0 && dtype.size() > 4) return "|V" + dtype.substr(4);
  throw npz_error(where + ": cannot write dtype '" + dtype + "' to .npy");
}

std::size_t item_size(const std::string& dtype) {
  if (dtype.rfind("void", 0) == 0 && dtype.size() > 4 && dtype.find_first_not_of("0123456789", 4) == std::string::npos) {
    return std::stoul(dtype.substr(4));
  }
  return dtype_size(dtype);
}

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t rd32(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24); }
uint64_t rd64(const uint8_t* p) { return uint64_t(rd32(p)) | (uint64_t(rd32(p + 4)) << 32); }

void put16(std::vector<uint8_t>* out, uint16_t v) {
  out->push_back(static_cast<uint8_t>(v));
  out->push_back(static_cast<uint8_t>(v >> 8));
}
void put32(std::vector<uint8_t>* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

uint32_t crc32(const uint8_t* data, std::size_t size, uint32_t crc) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

HostTensor parse_npy(const uint8_t* data, std::size_t size, const std::string& where) {
  static const uint8_t kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (size < 10 || std::memcmp(data, kMagic, 6) != 0) throw npz_error(where + " is not a .npy array (no NUMPY magic)");
  const int major = data[6];
  std::size_t header_len, header_start;
  if (major == 1) {
    header_len = rd16(data + 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw npz_error(where + ": truncated .npy header");
    header_len = rd32(data + 8);
    header_start = 12;
  } else {
    throw npz_error(where + ": .npy format version " + std::to_string(major) + " is not supported (1, 2 or 3)");
  }
  if (header_len > size - header_start) throw npz_error(where + ": truncated .npy header");
  const std::string header(reinterpret_cast<const char*>(data + header_start), header_len);

  std::string descr;
  bool fortran = false;
  HostTensor t;
  HeaderParser(header, where).parse(&descr, &fortran, &t.shape);
  std::size_t itemsize = 0;
  bool swap = false;
  decode_descr(descr, where, &t.dtype, &itemsize, &swap);

  const std::size_t payload = size - header_start - header_len;
  uint64_t count = 1;
  for (int64_t d : t.shape) {
    if (d != 0 && count > std::numeric_limits<uint64_t>::max() / 16 / static_cast<uint64_t>(d)) {
      throw npz_error(where + ": implausible shape");
    }
    count *= static_cast<uint64_t>(d);
  }
  const uint64_t nbytes = count * itemsize;
  if (nbytes != payload) {
    throw npz_error(where + ": the header announces " + descr + " of " + std::to_string(count) + " elements (" +
                    std::to_string(nbytes) + " bytes) but " + std::to_string(payload) + " bytes follow");
  }
  const uint8_t* src = data + header_start + header_len;
  t.data.assign(src, src + nbytes);
  if (swap) {
    for (std::size_t i = 0; i < count; ++i) std::reverse(t.data.begin() + i * itemsize, t.data.begin() + (i + 1) * itemsize);
  }
  if (fortran && t.shape.size() > 1 && count > 0) {
    // Element (i_0, ..., i_{n-1}) sits at sum_k i_k * prod_{j<k} dim_j in Fortran order.
    const std::size_t nd = t.shape.size();
    std::vector<uint64_t> fstride(nd, 1);
    for (std::size_t k = 1; k < nd; ++k) fstride[k] = fstride[k - 1] * static_cast<uint64_t>(t.shape[k - 1]);
    std::vector<uint8_t> c_order(t.data.size());
    std::vector<int64_t> idx(nd, 0);
    uint64_t foff = 0;
    for (uint64_t l = 0; l < count; ++l) {
      std::memcpy(c_order.data() + l * itemsize, t.data.data() + foff * itemsize, itemsize);
      for (std::size_t k = nd; k-- > 0;) {  // increment the C-order multi-index, last axis fastest
        if (++idx[k] < t.shape[k]) {
          foff += fstride[k];
          break;
        }
        idx[k] = 0;
        foff -= fstride[k] * static_cast<uint64_t>(t.shape[k] - 1);
      }
    }
    t.data.swap(c_order);
  }
  return t;
}

std::vector<uint8_t> format_npy(const HostTensor& tensor) {
  const std::string descr = encode_descr(tensor.dtype, "array");
  std::string shape = "(";
  for (std::size_t i = 0; i < tensor.shape.size(); ++i) shape += std::to_string(tensor.shape[i]) + ", ";
  if (tensor.shape.size() > 1) shape.resize(shape.size() - 2);
  else if (tensor.shape.size() == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad with spaces and a final newline so that magic + version + length + header is a multiple of 64.
  std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 65535) throw npz_error("array header too long for .npy 1.0");
  const uint64_t count = static_cast<uint64_t>(tensor.numel());
  if (tensor.numel() < 0 || tensor.data.size() != count * item_size(tensor.dtype)) {
    throw npz_error("array of dtype " + tensor.dtype + " holds " + std::to_string(tensor.data.size()) +
                    " bytes, which does not match its shape");
  }
  std::vector<uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  put16(&out, static_cast<uint16_t>(header.size()));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), tensor.data.begin(), tensor.data.end());
  return out;
}

std::vector<std::pair<std::string, HostTensor>> load_npz(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw npz_error("cannot open " + path + " (expected an .npz file of name -> array, as np.savez writes)");
  std::vector<uint8_t> z((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto bad = [&](const std::string& msg) { return npz_error(path + " is not a readable .npz file: " + msg); };
  const uint64_t n = z.size();
  if (n < 22) throw bad("too short for a ZIP archive");

  // End of central directory record: the last "PK\5\6" with a consistent comment length.
  int64_t eocd = -1;
  for (int64_t p = static_cast<int64_t>(n) - 22; p >= 0 && p >= static_cast<int64_t>(n) - 22 - 65535; --p) {
    if (rd32(&z[p]) == 0x06054b50 && p + 22 + rd16(&z[p + 20]) == static_cast<int64_t>(n)) {
      eocd = p;
      break;
    }
  }
  if (eocd < 0) throw bad("no end-of-central-directory record (not a ZIP archive)");
  uint64_t entries = rd16(&z[eocd + 10]);
  uint64_t cd_size = rd32(&z[eocd + 12]);
  uint64_t cd_offset = rd32(&z[eocd + 16]);
  if (entries == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    // ZIP64 end of central directory locator right before the EOCD, pointing at the ZIP64 record.
    if (eocd < 20 || rd32(&z[eocd - 20]) != 0x07064b50) throw bad("ZIP64 locator missing");
    uint64_t rec = rd64(&z[eocd - 20 + 8]);
    if (n < 56 || rec > n - 56 || rd32(&z[rec]) != 0x06064b50) throw bad("ZIP64 end record missing");
    entries = rd64(&z[rec + 32]);
    cd_size = rd64(&z[rec + 40]);
    cd_offset = rd64(&z[rec + 48]);
  }
  if (cd_offset > n || cd_size > n - cd_offset) throw bad("central directory out of bounds");

  std::vector<std::pair<std::string, HostTensor>> out;
  uint64_t p = cd_offset;
  for (uint64_t e = 0; e < entries; ++e) {
    if (p + 46 > cd_offset + cd_size || rd32(&z[p]) != 0x02014b50) throw bad("central directory entry " + std::to_string(e) + " is damaged");
    const uint16_t flags = rd16(&z[p + 8]);
    const uint16_t method = rd16(&z[p + 10]);
    const uint32_t crc = rd32(&z[p + 16]);
    uint64_t csize = rd32(&z[p + 20]);
    uint64_t usize = rd32(&z[p + 24]);
    const uint16_t name_len = rd16(&z[p + 28]), extra_len = rd16(&z[p + 30]), comment_len = rd16(&z[p + 32]);
    uint64_t local = rd32(&z[p + 42]);
    if (p + 46 + name_len + extra_len + comment_len > cd_offset + cd_size) throw bad("central directory entry overruns");
    const std::string name(reinterpret_cast<const char*>(&z[p + 46]), name_len);
    // ZIP64 extended information: the 64-bit values of the fields saturated at 0xFFFFFFFF, in order.
    for (uint64_t x = p + 46 + name_len; x + 4 <= p + 46 + name_len + extra_len;) {
      const uint16_t id = rd16(&z[x]), len = rd16(&z[x + 2]);
      if (x + 4 + len > p + 46 + name_len + extra_len) throw bad("extra field of '" + name + "' overruns");
      if (id == 0x0001) {
        uint64_t q = x + 4, qend = x + 4 + len;
        auto take = [&](uint64_t* v) {
          if (*v != 0xFFFFFFFF) return;
          if (q + 8 > qend) throw bad("short ZIP64 field for '" + name + "'");
          *v = rd64(&z[q]);
          q += 8;
        };
        take(&usize);
        take(&csize);
        take(&local);
      }
      x += 4 + len;
    }
    p += 46 + name_len + extra_len + comment_len;

    if (flags & 0x1) throw npz_error(path + ": entry '" + name + "' is encrypted");
    if (method == 8) {
      throw npz_error(path + ": entry '" + name +
                      "' is compressed (np.savez_compressed); write the inputs with np.savez (uncompressed)");
    }
    if (method != 0) throw npz_error(path + ": entry '" + name + "' uses ZIP compression method " + std::to_string(method) + "; write the inputs with np.savez");
    if (csize != usize) throw bad("stored entry '" + name + "' has different compressed and uncompressed sizes");
    if (n < 30 || local > n - 30 || rd32(&z[local]) != 0x04034b50) throw bad("local header of '" + name + "' missing");
    const uint64_t data_start = local + 30 + rd16(&z[local + 26]) + rd16(&z[local + 28]);
    if (data_start > n || usize > n - data_start) throw bad("data of '" + name + "' out of bounds");
    if (crc32(&z[data_start], usize) != crc) throw bad("CRC mismatch in entry '" + name + "' (the file is damaged)");
    if (name.size() < 5 || name.compare(name.size() - 4, 4, ".npy") != 0) {
      throw npz_error(path + ": entry '" + name + "' is not a .npy array; the .npz should hold arrays only");
    }
    const std::string key = name.substr(0, name.size() - 4);
    out.emplace_back(key, parse_npy(&z[data_start], usize, path + ": array '" + key + "'"));
  }
  return out;
}

void save_npz(const std::string& path, const std::vector<std::pair<std::string, const HostTensor*>>& arrays) {
  const std::string tmp = path + ".tmp";
  std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
  if (!f) throw npz_error("cannot write " + path);
  std::vector<uint8_t> central;
  uint64_t offset = 0;
  const uint16_t kVersion = 20, kDate = (0 << 9) | (1 << 5) | 1;  // 1980-01-01 00:00
  auto too_big = [&]() {
    return npz_error("cannot write " + path + ": the outputs exceed the 4 GiB a ZIP archive holds without ZIP64");
  };
  for (const auto& [key, tensor] : arrays) {
    const std::vector<uint8_t> npy = format_npy(*tensor);
    const std::string name = key + ".npy";
    if (name.size() > 65535 || arrays.size() >= 0xFFFF) throw too_big();
    if (npy.size() >= 0xFFFFFFFFull || offset >= 0xFFFFFFFFull) throw too_big();
    const uint32_t crc = crc32(npy.data(), npy.size());
    std::vector<uint8_t> local;
    put32(&local, 0x04034b50);
    put16(&local, kVersion);
    put16(&local, 0);  // flags
    put16(&local, 0);  // stored
    put16(&local, 0);  // time
    put16(&local, kDate);
    put32(&local, crc);
    put32(&local, static_cast<uint32_t>(npy.size()));
    put32(&local, static_cast<uint32_t>(npy.size()));
    put16(&local, static_cast<uint16_t>(name.size()));
    put16(&local, 0);  // extra length
    local.insert(local.end(), name.begin(), name.end());

    put32(&central, 0x02014b50);
    put16(&central, kVersion);  // made by
    put16(&central, kVersion);  // needed
    put16(&central, 0);
    put16(&central, 0);
    put16(&central, 0);
    put16(&central, kDate);
    put32(&central, crc);
    put32(&central, static_cast<uint32_t>(npy.size()));
    put32(&central, static_cast<uint32_t>(npy.size()));
    put16(&central, static_cast<uint16_t>(name.size()));
    put16(&central, 0);  // extra
    put16(&central, 0);  // comment
    put16(&central, 0);  // disk
    put16(&central, 0);  // internal attributes
    put32(&central, 0);  // external attributes
    put32(&central, static_cast<uint32_t>(offset));
    central.insert(central.end(), name.begin(), name.end());

    f.write(reinterpret_cast<const char*>(local.data()), static_cast<std::streamsize>(local.size()));
    f.write(reinterpret_cast<const char*>(npy.data()), static_cast<std::streamsize>(npy.size()));
    offset += local.size() + npy.size();
  }
  if (offset >= 0xFFFFFFFFull || central.size() >= 0xFFFFFFFFull - offset) throw too_big();
  std::vector<uint8_t> end;
  put32(&end, 0x06054b50);
  put16(&end, 0);
  put16(&end, 0);
  put16(&end, static_cast<uint16_t>(arrays.size()));
  put16(&end, static_cast<uint16_t>(arrays.size()));
  put32(&end, static_cast<uint32_t>(central.size()));
  put32(&end, static_cast<uint32_t>(offset));
  put16(&end, 0);
  f.write(reinterpret_cast<const char*>(central.data()), static_cast<std::streamsize>(central.size()));
  f.write(reinterpret_cast<const char*>(end.data()), static_cast<std::streamsize>(end.size()));
  f.close();
  if (!f) {
    std::remove(tmp.c_str());
    throw npz_error("writing " + path + " failed (disk full?)");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw npz_error("cannot replace " + path + ": " + ec.message());
  }
}

}  // namespace npz
}  // namespace cachefit
