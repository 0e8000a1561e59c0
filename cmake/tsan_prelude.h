// Force-included into our files (and the generated protobuf code) in the ThreadSanitizer build.
//
// Abseil there is built from source with TSan and learns of the sanitizer from
// __SANITIZE_THREAD__ in absl/base/config.h, read here first so that every Abseil header agrees
// with the library. Debian's libprotobuf is not instrumented, and protobuf's headers change class
// layouts when they see __SANITIZE_THREAD__ (MapFieldBase gains two counters): code compiled
// with it would disagree with the library about its own objects and crash. So protobuf must not
// see it.
#ifndef DILATTN_CMAKE_TSAN_PRELUDE_H_
#define DILATTN_CMAKE_TSAN_PRELUDE_H_

#include "absl/base/config.h"
#undef __SANITIZE_THREAD__

#endif  // DILATTN_CMAKE_TSAN_PRELUDE_H_
