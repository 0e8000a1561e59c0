#include "server/shared_memory.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/common/quote.h"
#include "server/cuda_ipc.h"
#include "server/log.h"

namespace dilattn::server {
namespace {

constexpr size_t kMaxNameBytes = 256;

absl::Status Invalid(absl::string_view message) { return absl::InvalidArgumentError(message); }

// strerror's text without its shared buffer: registrations arrive on concurrent handler threads.
std::string ErrorText(int error) {
  char buffer[256];
  return strerror_r(error, buffer, sizeof(buffer));  // GNU: returns the text, maybe not buffer
}

absl::Status CheckName(absl::string_view name) {
  if (name.empty()) return Invalid("shared memory region name is empty");
  if (name.size() > kMaxNameBytes) {
    return Invalid(absl::StrCat("shared memory region name has ", name.size(),
                                " bytes; at most ", kMaxNameBytes));
  }
  return absl::OkStatus();
}

// A POSIX shared-memory object name: leading slashes (shm_open ignores them), then one path
// component. Anything else could name a file outside /dev/shm.
absl::Status CheckKey(absl::string_view key) {
  absl::string_view rest = key;
  while (!rest.empty() && rest.front() == '/') rest.remove_prefix(1);
  if (rest.empty() || rest.size() > 255 || rest == "." || rest == ".." ||
      rest.find('/') != absl::string_view::npos || rest.find('\0') != absl::string_view::npos) {
    return Invalid(absl::StrCat("shared memory key ", Quote(key),
                                " is not a POSIX shared-memory object name ('/name', one path "
                                "component of at most 255 bytes)"));
  }
  return absl::OkStatus();
}

// The copy this thread is inside (CopyGuarded), if any, and the SIGBUS disposition found when
// the handler was installed.
// Volatile: the compiler knows memcpy reads no globals and would otherwise drop the store
// before it as dead.
thread_local sigjmp_buf* volatile guarded_copy = nullptr;
struct sigaction previous_sigbus;

void OnSigbus(int signal, siginfo_t*, void*) {
  if (guarded_copy != nullptr) siglongjmp(*guarded_copy, 1);
  // Not a guarded copy: put the previous disposition back; returning re-runs the faulting
  // instruction under it (by default, the process ends with a core dump).
  sigaction(signal, &previous_sigbus, nullptr);
}

void InstallSigbusHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = OnSigbus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &previous_sigbus);
  });
}

const char* KindName(RegionKind kind) {
  return kind == RegionKind::kSystem ? "system" : "CUDA";
}

}  // namespace

absl::Status ShrunkWhileInUse(const SharedMemoryRegion& region) {
  return Invalid(absl::StrCat("the shared memory object behind region ", Quote(region.info().name),
                              " shrank below the registered range while a request used it"));
}

absl::Status CopyGuarded(void* dst, const void* src, size_t bytes,
                         const SharedMemoryRegion& region) {
  InstallSigbusHandler();
  sigjmp_buf env;
  if (sigsetjmp(env, /*savemask=*/1) != 0) {
    guarded_copy = nullptr;
    return ShrunkWhileInUse(region);
  }
  guarded_copy = &env;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(dst, src, bytes);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  guarded_copy = nullptr;
  return absl::OkStatus();
}

SharedMemoryRegion::SharedMemoryRegion(Info info, std::byte* data, int fd,
                                       absl::AnyInvocable<void()> release)
    : info_(std::move(info)), data_(data), fd_(fd), release_(std::move(release)) {
  struct stat st;
  if (fd_ >= 0 && fstat(fd_, &st) == 0) {
    object_[0] = static_cast<uint64_t>(st.st_dev);
    object_[1] = static_cast<uint64_t>(st.st_ino);
  }
}

bool SharedMemoryRegion::Overlaps(const std::byte* a, size_t a_bytes,
                                  const SharedMemoryRegion& other, const std::byte* b,
                                  size_t b_bytes) const {
  if (info_.kind != other.info_.kind) return false;
  if (info_.kind == RegionKind::kCuda) return a < b + b_bytes && b < a + a_bytes;
  if (object_[0] != other.object_[0] || object_[1] != other.object_[1]) return false;
  const uint64_t at = info_.offset + static_cast<uint64_t>(a - data_);
  const uint64_t bt = other.info_.offset + static_cast<uint64_t>(b - other.data_);
  return at < bt + b_bytes && bt < at + a_bytes;
}

SharedMemoryRegion::~SharedMemoryRegion() {
  if (release_) release_();
  if (fd_ >= 0) close(fd_);
}

bool SharedMemoryRegion::StillBacked() const {
  if (fd_ < 0) return true;
  struct stat st;
  if (fstat(fd_, &st) != 0 || st.st_size < 0) return false;
  return static_cast<uint64_t>(st.st_size) >= info_.offset + info_.byte_size;
}

absl::Status SharedMemoryManager::RegisterSystem(absl::string_view name, absl::string_view key,
                                                 uint64_t offset, uint64_t byte_size) {
  if (!options_.enabled) return absl::UnavailableError("shared memory is switched off here");
  if (absl::Status s = CheckName(name); !s.ok()) return s;
  if (absl::Status s = CheckKey(key); !s.ok()) return s;
  if (byte_size == 0) return Invalid(absl::StrCat("region ", Quote(name), ": byte_size is 0"));
  if (offset > std::numeric_limits<uint64_t>::max() - byte_size ||
      offset + byte_size > static_cast<uint64_t>(std::numeric_limits<off_t>::max()) ||
      byte_size > std::numeric_limits<size_t>::max() / 2) {
    return Invalid(absl::StrCat("region ", Quote(name), ": offset ", offset, " + byte_size ",
                                byte_size, " overflows"));
  }
  {
    absl::MutexLock lock(&mu_);
    if (regions_.contains(name)) {
      return absl::AlreadyExistsError(
          absl::StrCat("shared memory region ", Quote(name), " is already registered"));
    }
  }
  const std::string key_string(key);
  const int fd = shm_open(key_string.c_str(), O_RDWR, 0);
  if (fd < 0) {
    return Invalid(absl::StrCat("region ", Quote(name), ": cannot open shared memory object ",
                                Quote(key), ": ", ErrorText(errno)));
  }
  struct stat st;
  const bool stat_ok = fstat(fd, &st) == 0;
  if (!stat_ok || !S_ISREG(st.st_mode) ||
      static_cast<uint64_t>(st.st_size) < offset + byte_size) {
    const int64_t size = stat_ok ? static_cast<int64_t>(st.st_size) : -1;
    close(fd);
    return Invalid(absl::StrCat("region ", Quote(name), ": shared memory object ", Quote(key),
                                " has ", size, " bytes, fewer than offset ", offset,
                                " + byte_size ", byte_size));
  }
  // mmap wants a page-aligned file offset: map from the page holding `offset`.
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t map_offset = offset / page * page;
  const size_t map_bytes = static_cast<size_t>(byte_size + (offset - map_offset));
  void* base = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                    static_cast<off_t>(map_offset));
  if (base == MAP_FAILED) {
    const int err = errno;
    close(fd);
    return Invalid(absl::StrCat("region ", Quote(name), ": cannot map shared memory object ",
                                Quote(key), ": ", ErrorText(err)));
  }
  SharedMemoryRegion::Info info;
  info.kind = RegionKind::kSystem;
  info.name = std::string(name);
  info.key = key_string;
  info.offset = offset;
  info.byte_size = byte_size;
  const int pin_device = options_.pin_for_device;
  if (pin_device >= 0) {
    absl::Status pinned = CudaHostPin(base, map_bytes, pin_device);
    info.pinned = pinned.ok();
    if (!pinned.ok()) {
      LogWarning("region '%s' stays pageable (GPU copies from it are synchronous): %s", name,
                 pinned.ToString());
    }
  }
  const bool pinned = info.pinned;
  auto region = std::make_shared<SharedMemoryRegion>(
      std::move(info), static_cast<std::byte*>(base) + (offset - map_offset), fd,
      [base, map_bytes, pinned, pin_device] {
        if (pinned) CudaHostUnpin(base, pin_device);
        munmap(base, map_bytes);
      });
  return Add(std::move(region));
}

absl::Status SharedMemoryManager::RegisterCuda(absl::string_view name,
                                               absl::string_view raw_handle, int64_t device,
                                               uint64_t byte_size) {
  if (!options_.enabled) return absl::UnavailableError("shared memory is switched off here");
  if (options_.gpus_available != nullptr) {
    if (absl::Status s = options_.gpus_available(); !s.ok()) return s;
  }
  if (absl::Status s = CheckName(name); !s.ok()) return s;
  if (byte_size == 0) return Invalid(absl::StrCat("region ", Quote(name), ": byte_size is 0"));
  if (byte_size > std::numeric_limits<size_t>::max() / 2) {
    return Invalid(
        absl::StrCat("region ", Quote(name), ": byte_size ", byte_size, " is too large"));
  }
  if (device < 0 || device > std::numeric_limits<int>::max()) {
    return Invalid(absl::StrCat("region ", Quote(name), ": device_id ", device, " is invalid"));
  }
  {
    absl::MutexLock lock(&mu_);
    if (regions_.contains(name)) {
      return absl::AlreadyExistsError(
          absl::StrCat("shared memory region ", Quote(name), " is already registered"));
    }
  }
  const int dev = static_cast<int>(device);
  absl::StatusOr<void*> pointer = CudaIpcOpen(raw_handle, dev, static_cast<size_t>(byte_size));
  if (!pointer.ok()) {
    return absl::Status(pointer.status().code(),
                        absl::StrCat("region ", Quote(name), ": ", pointer.status().message()));
  }
  SharedMemoryRegion::Info info;
  info.kind = RegionKind::kCuda;
  info.name = std::string(name);
  info.byte_size = byte_size;
  info.device = dev;
  void* p = *pointer;
  return Add(std::make_shared<SharedMemoryRegion>(std::move(info), static_cast<std::byte*>(p), -1,
                                                  [p, dev] { CudaIpcClose(p, dev); }));
}

absl::Status SharedMemoryManager::Add(std::shared_ptr<SharedMemoryRegion> region) {
  {
    absl::MutexLock lock(&mu_);
    if (regions_.try_emplace(region->info().name, region).second) return absl::OkStatus();
  }
  // Another registration of the name won the race. This mapping goes, outside the lock: its
  // release may call into CUDA.
  const std::string name = region->info().name;
  region.reset();
  return absl::AlreadyExistsError(
      absl::StrCat("shared memory region ", Quote(name), " is already registered"));
}

absl::Status SharedMemoryManager::Unregister(RegionKind kind, absl::string_view name) {
  // Released outside the lock: a region's release may call into CUDA.
  std::vector<std::shared_ptr<const SharedMemoryRegion>> dropped;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = regions_.begin(); it != regions_.end();) {
      const bool match = it->second->info().kind == kind && (name.empty() || it->first == name);
      if (match) {
        dropped.push_back(std::move(it->second));
        regions_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SharedMemoryRegion::Info>> SharedMemoryManager::Status(
    RegionKind kind, absl::string_view name) const {
  std::vector<SharedMemoryRegion::Info> out;
  absl::MutexLock lock(&mu_);
  for (const auto& [region_name, region] : regions_) {
    if (region->info().kind != kind || (!name.empty() && region_name != name)) continue;
    out.push_back(region->info());
  }
  if (!name.empty() && out.empty()) {
    return absl::NotFoundError(absl::StrCat("no ", KindName(kind), " shared memory region ",
                                            Quote(name), " is registered"));
  }
  return out;
}

absl::StatusOr<SharedTensor> SharedMemoryManager::Resolve(absl::string_view name, int64_t offset,
                                                          int64_t byte_size,
                                                          absl::string_view what) const {
  if (!options_.enabled) {
    return Invalid(absl::StrCat(what, " names shared memory region ", Quote(name),
                                ", but shared memory is switched off here"));
  }
  std::shared_ptr<const SharedMemoryRegion> region;
  {
    absl::MutexLock lock(&mu_);
    auto it = regions_.find(name);
    if (it != regions_.end()) region = it->second;
  }
  if (region == nullptr) {
    return Invalid(
        absl::StrCat(what, ": shared memory region ", Quote(name), " is not registered"));
  }
  const uint64_t size = region->info().byte_size;
  if (offset < 0 || byte_size < 0 || static_cast<uint64_t>(offset) > size ||
      static_cast<uint64_t>(byte_size) > size - static_cast<uint64_t>(offset)) {
    return Invalid(absl::StrCat(what, ": offset ", offset, " + byte_size ", byte_size,
                                " lies outside shared memory region ", Quote(name), " (", size,
                                " bytes)"));
  }
  if (!region->StillBacked()) {
    return Invalid(absl::StrCat(what, ": the shared memory object behind region ", Quote(name),
                                " has shrunk below the registered range; register it again"));
  }
  SharedTensor t;
  t.data = region->data() + offset;
  t.device = region->info().kind == RegionKind::kCuda ? region->info().device : -1;
  t.region = std::move(region);
  return t;
}

}  // namespace dilattn::server
