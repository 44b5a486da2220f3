# FindCUDNN: locates cudnn.h and libcudnn (cuDNN 9: the graph API lives in libcudnn).
# Searches the apt layout (/usr/include/x86_64-linux-gnu) and the CUDA toolkit.
# Sets CUDNN_FOUND, CUDNN_VERSION and the imported target CUDNN::CUDNN.
find_path(CUDNN_INCLUDE_DIR cudnn.h
  HINTS ENV CUDNN_HOME ENV CUDNN_ROOT ${CUDAToolkit_INCLUDE_DIRS}
  PATH_SUFFIXES include include/x86_64-linux-gnu)
find_library(CUDNN_LIBRARY NAMES cudnn
  HINTS ENV CUDNN_HOME ENV CUDNN_ROOT ${CUDAToolkit_LIBRARY_DIR}
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
set(_cudnn_version_header "${CUDNN_INCLUDE_DIR}/cudnn_version.h")
if(CUDNN_INCLUDE_DIR AND EXISTS "${_cudnn_version_header}")
  file(STRINGS "${_cudnn_version_header}" _cudnn_major REGEX "^#define CUDNN_MAJOR +[0-9]+")
  file(STRINGS "${_cudnn_version_header}" _cudnn_minor REGEX "^#define CUDNN_MINOR +[0-9]+")
  string(REGEX MATCH "[0-9]+" _cudnn_major "${_cudnn_major}")
  string(REGEX MATCH "[0-9]+" _cudnn_minor "${_cudnn_minor}")
  set(CUDNN_VERSION "${_cudnn_major}.${_cudnn_minor}")
endif()
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(CUDNN REQUIRED_VARS CUDNN_LIBRARY CUDNN_INCLUDE_DIR VERSION_VAR CUDNN_VERSION)
if(CUDNN_FOUND AND NOT TARGET CUDNN::CUDNN)
  add_library(CUDNN::CUDNN UNKNOWN IMPORTED)
  set_target_properties(CUDNN::CUDNN PROPERTIES
    IMPORTED_LOCATION "${CUDNN_LIBRARY}" INTERFACE_INCLUDE_DIRECTORIES "${CUDNN_INCLUDE_DIR}")
endif()
mark_as_advanced(CUDNN_INCLUDE_DIR CUDNN_LIBRARY)
