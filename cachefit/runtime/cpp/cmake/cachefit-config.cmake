# find_package(cachefit) for C++ applications that embed cachefit's runtime.
#
#   cmake -S . -B build $(cachefit config --cmake-args)      # or -DCMAKE_PREFIX_PATH=$(cachefit config --cmake-prefix)
#   find_package(cachefit REQUIRED)
#   target_link_libraries(my_app PRIVATE cachefit::runtime)
#
# Defines cachefit::runtime: a static library built from cachefit_runtime.cc in the consumer's build tree,
# with cachefit_runtime.h on its include path, linked against TVM's libtvm_runtime and libtvm_ffi from the
# apache-tvm wheel (build RPATH set, so programs run without LD_LIBRARY_PATH).
#
# Inputs (cache variables; `cachefit config --cmake-args` prints them). When one is empty, the Python
# interpreter CACHEFIT_PYTHON (default: python3 on PATH) is asked where the apache-tvm wheel lives.
#   CACHEFIT_TVM_LIB_DIR          folder with libtvm_runtime.so (and libtvm_runtime_cuda.so)
#   CACHEFIT_TVM_FFI_INCLUDE_DIR  tvm-ffi headers (tvm/ffi/*.h, dlpack/dlpack.h)
#   CACHEFIT_TVM_FFI_LIB_DIR      folder with libtvm_ffi.so
# Also needs nlohmann_json (Debian/Ubuntu: apt-get install nlohmann-json3-dev).

if(TARGET cachefit::runtime)
  set(cachefit_FOUND TRUE)
  return()
endif()

get_filename_component(_cachefit_src "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

set(CACHEFIT_TVM_LIB_DIR "${CACHEFIT_TVM_LIB_DIR}" CACHE PATH "Folder with libtvm_runtime.so (apache-tvm wheel: tvm/lib)")
set(CACHEFIT_TVM_FFI_INCLUDE_DIR "${CACHEFIT_TVM_FFI_INCLUDE_DIR}" CACHE PATH "tvm-ffi headers (python -m tvm_ffi.config --includedir)")
set(CACHEFIT_TVM_FFI_LIB_DIR "${CACHEFIT_TVM_FFI_LIB_DIR}" CACHE PATH "Folder with libtvm_ffi.so (python -m tvm_ffi.config --libdir)")
set(CACHEFIT_PYTHON "${CACHEFIT_PYTHON}" CACHE FILEPATH "Python with apache-tvm installed, asked for the TVM paths")

macro(_cachefit_not_found msg)
  set(cachefit_FOUND FALSE)
  set(cachefit_NOT_FOUND_MESSAGE "${msg}")
  return()
endmacro()

if(NOT CACHEFIT_TVM_LIB_DIR OR NOT CACHEFIT_TVM_FFI_INCLUDE_DIR OR NOT CACHEFIT_TVM_FFI_LIB_DIR)
  set(_cachefit_py "${CACHEFIT_PYTHON}")
  if(NOT _cachefit_py)
    find_program(_cachefit_py_found NAMES python3 python)
    set(_cachefit_py "${_cachefit_py_found}")
  endif()
  if(NOT _cachefit_py)
    _cachefit_not_found("cachefit: no Python found to locate apache-tvm; pass $(cachefit config --cmake-args) or -DCACHEFIT_PYTHON=...")
  endif()
  execute_process(
    COMMAND "${_cachefit_py}" -c "import importlib.util as u, os
t, f = u.find_spec('tvm'), u.find_spec('tvm_ffi')
assert t and f, 'apache-tvm is not installed in this Python'
t, f = list(t.submodule_search_locations)[0], list(f.submodule_search_locations)[0]
print(os.path.join(t, 'lib')); print(os.path.join(f, 'include')); print(os.path.join(f, 'lib'))"
    OUTPUT_VARIABLE _cachefit_paths ERROR_VARIABLE _cachefit_err RESULT_VARIABLE _cachefit_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _cachefit_rc EQUAL 0)
    _cachefit_not_found("cachefit: ${_cachefit_py} cannot locate apache-tvm (${_cachefit_err}); pip install apache-tvm, or pass $(cachefit config --cmake-args)")
  endif()
  string(REPLACE "\n" ";" _cachefit_paths "${_cachefit_paths}")
  list(GET _cachefit_paths 0 _p0)
  list(GET _cachefit_paths 1 _p1)
  list(GET _cachefit_paths 2 _p2)
  if(NOT CACHEFIT_TVM_LIB_DIR)
    set(CACHEFIT_TVM_LIB_DIR "${_p0}" CACHE PATH "" FORCE)
  endif()
  if(NOT CACHEFIT_TVM_FFI_INCLUDE_DIR)
    set(CACHEFIT_TVM_FFI_INCLUDE_DIR "${_p1}" CACHE PATH "" FORCE)
  endif()
  if(NOT CACHEFIT_TVM_FFI_LIB_DIR)
    set(CACHEFIT_TVM_FFI_LIB_DIR "${_p2}" CACHE PATH "" FORCE)
  endif()
endif()

foreach(_f "${CACHEFIT_TVM_LIB_DIR}/libtvm_runtime.so" "${CACHEFIT_TVM_FFI_LIB_DIR}/libtvm_ffi.so"
           "${CACHEFIT_TVM_FFI_INCLUDE_DIR}/tvm/ffi/function.h" "${CACHEFIT_TVM_FFI_INCLUDE_DIR}/dlpack/dlpack.h")
  if(NOT EXISTS "${_f}")
    _cachefit_not_found("cachefit: ${_f} does not exist; check CACHEFIT_TVM_LIB_DIR / CACHEFIT_TVM_FFI_INCLUDE_DIR / CACHEFIT_TVM_FFI_LIB_DIR (cachefit config --cmake-args prints them)")
  endif()
endforeach()

find_package(nlohmann_json 3.2 QUIET)
if(NOT nlohmann_json_FOUND)
  find_path(CACHEFIT_JSON_INCLUDE_DIR nlohmann/json.hpp)
  if(NOT CACHEFIT_JSON_INCLUDE_DIR)
    _cachefit_not_found("cachefit: the nlohmann JSON library is missing: apt-get install nlohmann-json3-dev (or set CACHEFIT_JSON_INCLUDE_DIR to a folder holding nlohmann/json.hpp)")
  endif()
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CACHEFIT_JSON_INCLUDE_DIR}")
endif()

add_library(cachefit::tvm_runtime SHARED IMPORTED)
set_target_properties(cachefit::tvm_runtime PROPERTIES IMPORTED_LOCATION "${CACHEFIT_TVM_LIB_DIR}/libtvm_runtime.so")
add_library(cachefit::tvm_ffi SHARED IMPORTED)
set_target_properties(cachefit::tvm_ffi PROPERTIES
  IMPORTED_LOCATION "${CACHEFIT_TVM_FFI_LIB_DIR}/libtvm_ffi.so"
  INTERFACE_INCLUDE_DIRECTORIES "${CACHEFIT_TVM_FFI_INCLUDE_DIR}")

add_library(cachefit_runtime STATIC "${_cachefit_src}/cachefit_runtime.cc" "${_cachefit_src}/cachefit_runtime.h")
add_library(cachefit::runtime ALIAS cachefit_runtime)
target_compile_features(cachefit_runtime PUBLIC cxx_std_17)
set_target_properties(cachefit_runtime PROPERTIES POSITION_INDEPENDENT_CODE ON CXX_EXTENSIONS OFF)
target_include_directories(cachefit_runtime PUBLIC "${_cachefit_src}")
# libtvm_runtime_cuda.so (CUDA stages) and, if the linker dropped it, libtvm_runtime.so are opened from here.
target_compile_definitions(cachefit_runtime PRIVATE CACHEFIT_TVM_LIB_DIR="${CACHEFIT_TVM_LIB_DIR}")
target_link_libraries(cachefit_runtime
  PRIVATE nlohmann_json::nlohmann_json
  PUBLIC cachefit::tvm_runtime cachefit::tvm_ffi ${CMAKE_DL_LIBS})
# Programs find TVM's libraries through their RUNPATH, also once installed.
target_link_options(cachefit_runtime INTERFACE
  "LINKER:-rpath,${CACHEFIT_TVM_LIB_DIR}" "LINKER:-rpath,${CACHEFIT_TVM_FFI_LIB_DIR}")

set(cachefit_FOUND TRUE)
