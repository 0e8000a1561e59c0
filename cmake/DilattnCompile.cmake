# Warnings as errors and optional sanitizers, applied to our own targets only (never to the
# system's headers or generated protobuf code).

add_library(dilattn_options INTERFACE)
target_compile_options(dilattn_options INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror -Wno-missing-field-initializers>)
target_include_directories(dilattn_options INTERFACE ${PROJECT_SOURCE_DIR})

if(DILATTN_SANITIZE)
  set(_san -fsanitize=${DILATTN_SANITIZE} -fno-omit-frame-pointer)
  if(DILATTN_SANITIZE MATCHES "undefined")
    list(APPEND _san -fno-sanitize-recover=all)
  endif()
  # GCC 12's -Wmaybe-uninitialized misfires on std::variant under sanitizer instrumentation.
  list(APPEND _san $<$<COMPILE_LANGUAGE:CXX>:-Wno-maybe-uninitialized>)
  add_compile_options(${_san})
  add_link_options(-fsanitize=${DILATTN_SANITIZE})
endif()

# Marks an object library or target as ours: warnings, include root.
function(dilattn_target target)
  target_link_libraries(${target} PRIVATE dilattn_options)
endfunction()
