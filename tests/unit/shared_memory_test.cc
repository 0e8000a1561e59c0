// The shared-memory registry: what a registered range resolves to, that a resolved range keeps
// its mapping past unregistration, and that every bad name, key, range and handle is refused
// with its reason.

#include "server/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dilattn::server {
namespace {

using ::testing::HasSubstr;

// A POSIX shared-memory object of `bytes`, filled with byte i = i % 251, unlinked at the end.
class ShmObject {
 public:
  explicit ShmObject(size_t bytes) : key_(absl::StrCat("/dilattn_unit_", getpid(), "_", next_++)) {
    fd_ = shm_open(key_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    EXPECT_GE(fd_, 0);
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(bytes)), 0);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    EXPECT_NE(p, MAP_FAILED);
    auto* b = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) b[i] = static_cast<unsigned char>(i % 251);
    munmap(p, bytes);
  }
  ~ShmObject() {
    close(fd_);
    shm_unlink(key_.c_str());
  }
  const std::string& key() const { return key_; }
  void Truncate(size_t bytes) { ASSERT_EQ(ftruncate(fd_, static_cast<off_t>(bytes)), 0); }

 private:
  static inline std::atomic<int> next_{0};
  std::string key_;
  int fd_ = -1;
};

TEST(SharedMemory, ResolvesRangesAtUnalignedOffsets) {
  ShmObject object(3 * 4096);
  SharedMemoryManager m({});
  ASSERT_TRUE(m.RegisterSystem("r", object.key(), 4097, 8000).ok());
  absl::StatusOr<SharedTensor> t = m.Resolve("r", 100, 64, "input 'Q'");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->device, -1);
  // Byte j of the range is byte 4097 + 100 + j of the object.
  for (int j = 0; j < 64; ++j) {
    EXPECT_EQ(static_cast<unsigned char>(t->data[j]), (4197 + j) % 251) << j;
  }
  // Writes land in the object (the server writes outputs there).
  t->data[0] = std::byte{7};
  absl::StatusOr<SharedTensor> again = m.Resolve("r", 100, 1, "output 'O'");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->data[0], std::byte{7});
}

TEST(SharedMemory, ResolvedRangeOutlivesUnregistration) {
  ShmObject object(4096);
  SharedMemoryManager m({});
  ASSERT_TRUE(m.RegisterSystem("r", object.key(), 0, 4096).ok());
  absl::StatusOr<SharedTensor> t = m.Resolve("r", 0, 4096, "input 'Q'");
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(m.Unregister(RegionKind::kSystem, "r").ok());
  EXPECT_EQ(static_cast<unsigned char>(t->data[4095]), 4095 % 251);  // still mapped
  EXPECT_THAT(m.Resolve("r", 0, 1, "input 'K'").status().message(),
              HasSubstr("input 'K': shared memory region 'r' is not registered"));
  // The name is free again.
  EXPECT_TRUE(m.RegisterSystem("r", object.key(), 0, 16).ok());
}

TEST(SharedMemory, RejectsBadRegistrations) {
  ShmObject object(4096);
  SharedMemoryManager m({});
  ASSERT_TRUE(m.RegisterSystem("r", object.key(), 0, 4096).ok());
  absl::Status s = m.RegisterSystem("r", object.key(), 0, 16);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(s.message(), HasSubstr("'r' is already registered"));
  for (const char* key : {"", "/", "/a/b", "/..", "../x", "x/"}) {
    s = m.RegisterSystem("k", key, 0, 16);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_THAT(s.message(), HasSubstr("not a POSIX shared-memory object name")) << key;
  }
  s = m.RegisterSystem("k", "/dilattn_unit_no_such_object", 0, 16);
  EXPECT_THAT(s.message(), HasSubstr("cannot open shared memory object"));
  s = m.RegisterSystem("k", object.key(), 1, 4096);
  EXPECT_THAT(s.message(), HasSubstr("has 4096 bytes, fewer than offset 1 + byte_size 4096"));
  s = m.RegisterSystem("k", object.key(), 0, 0);
  EXPECT_THAT(s.message(), HasSubstr("byte_size is 0"));
  s = m.RegisterSystem("k", object.key(), std::numeric_limits<uint64_t>::max(), 2);
  EXPECT_THAT(s.message(), HasSubstr("overflows"));
  s = m.RegisterSystem("", object.key(), 0, 16);
  EXPECT_THAT(s.message(), HasSubstr("name is empty"));
  s = m.RegisterSystem(std::string(300, 'n'), object.key(), 0, 16);
  EXPECT_THAT(s.message(), HasSubstr("at most 256"));
  // A CUDA handle that cannot be one: refused with its reason whether or not CUDA is here.
  s = m.RegisterCuda("c", std::string(10, '\1'), 0, 16);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("region 'c'"));
  s = m.RegisterCuda("c", std::string(64, '\0'), -1, 16);
  EXPECT_THAT(s.message(), HasSubstr("device_id -1 is invalid"));
  s = m.RegisterCuda("c", std::string(64, '\0'), 0, 0);
  EXPECT_THAT(s.message(), HasSubstr("byte_size is 0"));
  absl::StatusOr<std::vector<SharedMemoryRegion::Info>> cuda = m.Status(RegionKind::kCuda, "");
  ASSERT_TRUE(cuda.ok());
  EXPECT_TRUE(cuda->empty());
}

TEST(SharedMemory, RejectsRangesOutsideTheRegion) {
  ShmObject object(4096);
  SharedMemoryManager m({});
  ASSERT_TRUE(m.RegisterSystem("r", object.key(), 0, 1000).ok());
  EXPECT_TRUE(m.Resolve("r", 0, 1000, "t").ok());
  EXPECT_TRUE(m.Resolve("r", 999, 1, "t").ok());
  EXPECT_TRUE(m.Resolve("r", 1000, 0, "t").ok());
  for (auto [offset, bytes] : std::vector<std::pair<int64_t, int64_t>>{
           {0, 1001}, {1, 1000}, {1000, 1}, {-1, 1}, {0, -1},
           {std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max()},
           {1, std::numeric_limits<int64_t>::max()}}) {
    absl::Status s = m.Resolve("r", offset, bytes, "input 'V'").status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << offset << " " << bytes;
    EXPECT_THAT(s.message(), HasSubstr("input 'V': offset"));
    EXPECT_THAT(s.message(), HasSubstr("lies outside shared memory region 'r' (1000 bytes)"));
  }
}

TEST(SharedMemory, RefusesAnObjectShrunkAfterRegistration) {
  ShmObject object(8192);
  SharedMemoryManager m({});
  ASSERT_TRUE(m.RegisterSystem("r", object.key(), 0, 8192).ok());
  object.Truncate(100);
  absl::Status s = m.Resolve("r", 0, 16, "input 'Q'").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("has shrunk below the registered range"));
}

// The same for a region that starts inside its object: what must stay backed is the registered
// range, offset included, not just byte_size bytes from the object's start.
TEST(SharedMemory, RefusesAnObjectShrunkBelowARangeAtAnOffset) {
  ShmObject object(8192);
  SharedMemoryManager m({});
  ASSERT_TRUE(m.RegisterSystem("r", object.key(), 4096, 4096).ok());
  object.Truncate(6000);  // more than byte_size, less than offset + byte_size
  absl::Status s = m.Resolve("r", 0, 16, "input 'Q'").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("has shrunk below the registered range"));
}

// The object shrinks after the range was resolved: copies from and to the mapping past its new
// end fail by name (the CPU would take SIGBUS there), again and again, and from any thread,
// while the bytes still backed copy as before. Unrelated SIGBUS is not swallowed (the death
// test).
// Registers all of `object` (`bytes` long) as region "r" and resolves it whole.
absl::StatusOr<SharedTensor> WholeObject(SharedMemoryManager& m, const ShmObject& object,
                                         int64_t bytes) {
  if (absl::Status s = m.RegisterSystem("r", object.key(), 0, static_cast<uint64_t>(bytes));
      !s.ok()) {
    return s;
  }
  return m.Resolve("r", 0, bytes, "input 'Q'");
}

TEST(SharedMemory, CopiesFromAShrunkObjectFailInsteadOfFaulting) {
  ShmObject object(4 * 4096);
  SharedMemoryManager m({});
  absl::StatusOr<SharedTensor> t = WholeObject(m, object, 4 * 4096);
  ASSERT_TRUE(t.ok()) << t.status();
  object.Truncate(4096);
  std::vector<std::byte> buffer(3 * 4096);
  for (int round = 0; round < 3; ++round) {
    absl::Status in = CopyGuarded(buffer.data(), t->data + 4096, 4096, *t->region);
    EXPECT_EQ(in.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(in.message(), HasSubstr("region 'r' shrank below the registered range"));
    EXPECT_FALSE(CopyGuarded(t->data + 2 * 4096, buffer.data(), 4096, *t->region).ok());
  }
  ASSERT_TRUE(CopyGuarded(buffer.data(), t->data, 4096, *t->region).ok());
  EXPECT_EQ(static_cast<unsigned char>(buffer[300]), 300 % 251);
  std::thread other(
      [&] { EXPECT_FALSE(CopyGuarded(buffer.data(), t->data + 8192, 64, *t->region).ok()); });
  other.join();
}

TEST(SharedMemoryDeathTest, SigbusOutsideAGuardedCopyStillEndsTheProcess) {
  ShmObject object(2 * 4096);
  SharedMemoryManager m({});
  absl::StatusOr<SharedTensor> t = WholeObject(m, object, 2 * 4096);
  ASSERT_TRUE(t.ok()) << t.status();
  std::byte b[1];
  ASSERT_TRUE(CopyGuarded(b, t->data, 1, *t->region).ok());  // the handler is installed
  object.Truncate(0);
  EXPECT_DEATH(
      {
        volatile std::byte* p = t->data + 4096;
        *p = std::byte{1};
      },
      "");
}

TEST(SharedMemory, StatusAndUnregisterByKind) {
  ShmObject object(4096);
  SharedMemoryManager m({});
  ASSERT_TRUE(m.RegisterSystem("a", object.key(), 0, 100).ok());
  ASSERT_TRUE(m.RegisterSystem("b", object.key(), 100, 200).ok());
  absl::StatusOr<std::vector<SharedMemoryRegion::Info>> all = m.Status(RegionKind::kSystem, "");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 2u);
  absl::StatusOr<std::vector<SharedMemoryRegion::Info>> b = m.Status(RegionKind::kSystem, "b");
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(b->size(), 1u);
  EXPECT_EQ((*b)[0].key, object.key());
  EXPECT_EQ((*b)[0].offset, 100u);
  EXPECT_EQ((*b)[0].byte_size, 200u);
  EXPECT_EQ(m.Status(RegionKind::kCuda, "b").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m.Status(RegionKind::kSystem, "zz").status().code(), absl::StatusCode::kNotFound);
  // Unregistering the other kind, or an unknown name, leaves everything.
  EXPECT_TRUE(m.Unregister(RegionKind::kCuda, "").ok());
  EXPECT_TRUE(m.Unregister(RegionKind::kSystem, "zz").ok());
  EXPECT_EQ(m.Status(RegionKind::kSystem, "")->size(), 2u);
  EXPECT_TRUE(m.Unregister(RegionKind::kSystem, "").ok());
  EXPECT_TRUE(m.Status(RegionKind::kSystem, "")->empty());
}

TEST(SharedMemory, SwitchedOff) {
  ShmObject object(4096);
  SharedMemoryManager m({.enabled = false});
  EXPECT_EQ(m.RegisterSystem("r", object.key(), 0, 16).code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.Resolve("r", 0, 16, "input 'Q'").status().message(),
              HasSubstr("shared memory is switched off"));
}

// Once the GPUs stopped, a CUDA region is refused with the engine's status before any CUDA call
// (whose sticky error would read as a bad handle); system regions still register.
TEST(SharedMemory, CudaRegionsRefusedOnceTheGpusStopped) {
  ShmObject object(4096);
  SharedMemoryManager m({.gpus_available = [] {
    return absl::UnavailableError("this server's GPUs stopped after a device error");
  }});
  const absl::Status s = m.RegisterCuda("c", std::string(64, '\0'), 0, 4096);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(s.message(), HasSubstr("GPUs stopped")) << s;
  EXPECT_TRUE(m.RegisterSystem("r", object.key(), 0, 16).ok());
}

// Registrations, lookups and unregistrations from many threads: every lookup either finds a
// fully mapped region or none.
TEST(SharedMemory, ConcurrentUse) {
  ShmObject object(4096);
  SharedMemoryManager m({});
  std::vector<std::thread> threads;
  std::atomic<int> resolved{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const std::string name = absl::StrCat("r", t % 2);
      for (int i = 0; i < 300; ++i) {
        (void)m.RegisterSystem(name, object.key(), 0, 4096);
        absl::StatusOr<SharedTensor> r = m.Resolve(name, 4000, 96, "t");
        if (r.ok()) {
          EXPECT_EQ(static_cast<unsigned char>(r->data[95]), 4095 % 251);
          resolved.fetch_add(1);
        }
        if (i % 3 == 0) (void)m.Unregister(RegionKind::kSystem, name);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_GT(resolved.load(), 0);
}

}  // namespace
}  // namespace dilattn::server
