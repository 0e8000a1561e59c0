// dilattn-client: health, metadata, one inference, or a load benchmark against dilattn-server.
//
//   dilattn-client health   [--url localhost:8001] [--tls] [--tls-ca F] [--tls-cert F --tls-key F]
//   dilattn-client metadata [--url ...] [--model M]
//   dilattn-client infer    [--url ...] [--model M] [--shape B,N,H,D | B,N,E]
//                           [--dtype fp32|fp16|bf16]
//                           [--param key=value ...]
//   dilattn-client bench    (infer's flags) [--concurrency C] [--duration SECONDS] [--stream]
//   dilattn-client attend   (infer's flags) [--chunk-mib M]

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/client.h"
#include "kernels/common/clock.h"

namespace {

using dilattn::MonotonicNow;
using dilattn::client::Client;
using dilattn::client::InferOptions;
using dilattn::client::Tensor;

struct Flags {
  std::string command;
  std::string url = "localhost:8001";
  dilattn::client::ChannelOptions channel;
  std::string model = "dilated_attention";
  std::vector<int64_t> shape = {1, 4096, 8, 64};
  dilattn::attention::DType dtype = dilattn::attention::DType::kFloat32;
  std::map<std::string, std::string> params;
  int concurrency = 1;
  double duration = 10;
  bool stream = false;
  double chunk_mib = 4;
  bool help = false;  // -h, --help or the command help: usage on stdout, exit 0
};

constexpr int kMaxConcurrency = 4096;
constexpr double kMaxDurationSeconds = 7 * 24 * 3600;
// What each native-stream message needs beside its chunk's data.
constexpr size_t kChunkFramingBytes = 1024;

constexpr const char* kUsage = R"(usage: dilattn-client COMMAND [flags]
commands:
  health     server liveness, readiness and grpc.health.v1 status of every model
  metadata   server metadata, or a model's (--model)
  infer      one request of random tensors; prints latency and an output checksum
  attend     infer's problem through the native chunked stream (dilattn.v1), for sequences
             beyond one message; prints the stretch, first-output and total times
  bench      load for --duration seconds from --concurrency clients; live progress,
             then throughput and latency percentiles
flags:
  --url HOST:PORT        server (localhost:8001)
  --tls                  connect over TLS, trusting the system's CAs
  --tls-ca FILE          connect over TLS, trusting these CAs (PEM)
  --tls-cert FILE        mutual TLS: this client's certificate chain (PEM), and
  --tls-key FILE         its private key (PEM)
  --model NAME           model (dilated_attention)
  --shape B,N,H,D        Q, K and V of this shape (1,4096,8,64); B,N,E sends hidden states X
                         instead (multihead models; not with attend)
  --dtype fp32|fp16|bf16 tensor type (fp32)
  --param KEY=VALUE      request parameter, repeatable (segment_lengths=2048,4096);
                         priority and timeout (microseconds) take non-negative integers;
                         attend sends both in the stream's header, the timeout counting for
                         each stretch from when its input is complete (0: the model's default)
  --concurrency C        bench: concurrent clients (1)
  --duration SECONDS     bench: how long (10)
  --stream               bench: each client uses one ModelStreamInfer stream
  --chunk-mib M          attend: MiB of data per input chunk (4)
)";

std::string Parse(int argc, char** argv, Flags* f) {
  if (argc < 2) return "missing COMMAND";
  f->command = argv[1];
  auto is_help = [](const std::string& arg) { return arg == "-h" || arg == "--help"; };
  if (is_help(f->command) || f->command == "help") {
    f->help = true;
    return "";
  }
  for (int i = 2; i < argc; ++i) {
    const std::string name = argv[i];
    if (is_help(name)) {
      f->help = true;
      return "";
    }
    if (name == "--stream") {
      f->stream = true;
      continue;
    }
    if (name == "--tls") {
      f->channel.tls = true;
      continue;
    }
    if (i + 1 >= argc) return absl::StrCat(name, " needs a value");
    const std::string value = argv[++i];
    if (name == "--url") {
      f->url = value;
    } else if (name == "--tls-ca") {
      f->channel.tls = true;
      f->channel.ca = value;
    } else if (name == "--tls-cert") {
      f->channel.tls = true;
      f->channel.cert = value;
    } else if (name == "--tls-key") {
      f->channel.tls = true;
      f->channel.key = value;
    } else if (name == "--model") {
      f->model = value;
    } else if (name == "--shape") {
      std::vector<std::string> parts = absl::StrSplit(value, ',');
      if (parts.size() != 3 && parts.size() != 4) return "--shape needs B,N,H,D or B,N,E";
      f->shape.assign(parts.size(), 0);
      for (size_t d = 0; d < parts.size(); ++d) {
        if (!absl::SimpleAtoi(parts[d], &f->shape[d]) || f->shape[d] < 1) {
          return absl::StrCat("--shape: '", parts[d], "' is not a positive integer");
        }
      }
    } else if (name == "--dtype") {
      auto t = dilattn::attention::ParseDType(value);
      if (!t.ok()) return std::string(t.status().message());
      f->dtype = *t;
    } else if (name == "--param") {
      const size_t eq = value.find('=');
      if (eq == std::string::npos) return "--param needs KEY=VALUE";
      f->params[value.substr(0, eq)] = value.substr(eq + 1);
    } else if (name == "--concurrency") {
      // One thread and one connection each.
      if (!absl::SimpleAtoi(value, &f->concurrency) || f->concurrency < 1 ||
          f->concurrency > kMaxConcurrency) {
        return absl::StrCat("--concurrency: '", value, "' is not an integer in [1, ",
                            kMaxConcurrency, "]");
      }
    } else if (name == "--duration") {
      // SimpleAtod takes "nan" and "inf", which would never end the run.
      if (!absl::SimpleAtod(value, &f->duration) || !std::isfinite(f->duration) ||
          f->duration <= 0 || f->duration > kMaxDurationSeconds) {
        return absl::StrCat("--duration: '", value, "' is not a number of seconds in (0, ",
                            kMaxDurationSeconds, "]");
      }
    } else if (name == "--chunk-mib") {
      if (!absl::SimpleAtod(value, &f->chunk_mib) || !std::isfinite(f->chunk_mib) ||
          f->chunk_mib <= 0 || f->chunk_mib > 1024) {
        return absl::StrCat("--chunk-mib: '", value, "' is not a number of MiB in (0, 1024]");
      }
    } else {
      return absl::StrCat("unknown flag ", name);
    }
  }
  return "";
}

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i =
      std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * static_cast<double>(v.size())));
  return v[i];
}

int Health(Client& c, const Flags&) {
  auto live = c.ServerLive();
  auto ready = c.ServerReady();
  if (!live.ok()) {
    std::cerr << "server unreachable: " << live.status() << "\n";
    return 1;
  }
  std::cout << "live: " << *live << "\nready: " << (ready.ok() && *ready) << "\n";
  auto overall = c.Health("");
  std::cout << "health: " << (overall.ok() ? *overall : overall.status().ToString()) << "\n";
  grpc::ClientContext ctx;
  inference::RepositoryIndexResponse index;
  if (c.stub().RepositoryIndex(&ctx, {}, &index).ok()) {
    for (const auto& m : index.models()) {
      auto h = c.Health(m.name());
      std::cout << "model " << m.name() << ": " << m.state() << ", health "
                << (h.ok() ? *h : h.status().ToString()) << "\n";
    }
  }
  return *live && ready.ok() && *ready ? 0 : 1;
}

int Metadata(Client& c, const Flags& f, bool model_given) {
  if (!model_given) {
    auto m = c.ServerMetadata();
    if (!m.ok()) {
      std::cerr << m.status() << "\n";
      return 1;
    }
    std::cout << m->DebugString();
    return 0;
  }
  auto m = c.ModelMetadata(f.model);
  if (!m.ok()) {
    std::cerr << m.status() << "\n";
    return 1;
  }
  std::cout << m->DebugString();
  return 0;
}

// Random tensors of the flags' shape and dtype (Q, K, V, or X for a three-dim shape), and the
// request options they go with.
struct Inputs {
  Tensor q, k, v;
  InferOptions options;
  dilattn::client::NamedInputs named() const {
    if (q.shape.size() == 3) return {{"X", &q}};
    return {{"Q", &q}, {"K", &k}, {"V", &v}};
  }
};
// Refuses, before allocating, tensors the command could not send: infer and bench put every
// input in one message (under 2 GiB); attend streams them, but holds Q, K, V and O in memory.
absl::StatusOr<Inputs> MakeInputs(const Flags& f) {
  absl::StatusOr<size_t> bytes = dilattn::client::TensorBytes(f.dtype, f.shape);
  if (!bytes.ok()) return bytes.status();
  const size_t tensors = f.shape.size() == 4 ? 3 : 1;
  if (f.command == "attend") {
    const long pages = sysconf(_SC_PHYS_PAGES);
    const long page_bytes = sysconf(_SC_PAGE_SIZE);
    const double memory = pages > 0 && page_bytes > 0
                              ? static_cast<double>(pages) * static_cast<double>(page_bytes)
                              : 0;
    if (memory > 0 && 4 * static_cast<double>(*bytes) > memory) {
      return absl::ResourceExhaustedError(
          absl::StrCat("Q, K, V and O of this shape need 4 x ", *bytes, " bytes; this machine has ",
                       static_cast<uint64_t>(memory), " bytes of memory"));
    }
  } else if (*bytes > static_cast<size_t>(INT_MAX) / tensors) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the inputs of this shape need ", tensors, " x ", *bytes,
        " bytes, more than one message can carry (2 GiB); attend streams Q, K and V in chunks"));
  }
  Inputs in;
  in.options.model = f.model;
  in.options.parameters = f.params;
  Tensor* const dst[3] = {&in.q, &in.k, &in.v};
  for (size_t t = 0; t < tensors; ++t) {
    absl::StatusOr<Tensor> x = dilattn::client::RandomTensor(f.dtype, f.shape, t + 1);
    if (!x.ok()) return x.status();
    *dst[t] = *std::move(x);
  }
  return in;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

int InferOnce(Client& c, const Flags& f) {
  const absl::StatusOr<Inputs> in = MakeInputs(f);
  if (!in.ok()) {
    std::cerr << "infer: " << in.status() << "\n";
    return 2;
  }
  const absl::Time start = MonotonicNow();
  absl::StatusOr<Tensor> out = c.Infer(in->options, in->named());
  const double ms = absl::ToDoubleMilliseconds(MonotonicNow() - start);
  if (!out.ok()) {
    std::cerr << "infer failed: " << out.status() << "\n";
    return 1;
  }
  double sum = 0;
  const size_t n = out->bytes.size() / dilattn::attention::DTypeSize(out->dtype);
  for (size_t i = 0; i < n; ++i) {
    sum += dilattn::attention::LoadAsFloat(out->bytes.data(), out->dtype, i);
  }
  std::printf("%s %s %s in %.3f ms, sum %.6g\n", f.shape.size() == 3 ? "Y" : "O",
              ShapeText(out->shape).c_str(),
              std::string(dilattn::attention::DTypeName(out->dtype)).c_str(), ms, sum);
  return 0;
}

int AttendOnce(Client& c, const Flags& f) {
  if (f.shape.size() != 4) {
    std::cerr << "attend: the native stream carries Q, K, V: --shape B,N,H,D\n";
    return 2;
  }
  dilattn::client::AttendOptions options;
  options.model = f.model;
  options.parameters = f.params;
  // The scheduling parameters are refused before tensors of what may be gigabytes are made.
  if (absl::StatusOr<dilattn::v1::Header> header =
          dilattn::client::MakeAttendHeader(options, f.dtype, f.shape);
      !header.ok()) {
    std::cerr << "attend: " << header.status() << "\n";
    return 2;
  }
  const absl::StatusOr<Inputs> in = MakeInputs(f);
  if (!in.ok()) {
    std::cerr << "attend: " << in.status() << "\n";
    return 2;
  }
  // Leave room in each message for its framing where the chunk has room to spare; Attend sends
  // at least one token a chunk however small this is.
  const size_t message_bytes = static_cast<size_t>(f.chunk_mib * (1 << 20));
  options.chunk_bytes =
      message_bytes > 2 * kChunkFramingBytes ? message_bytes - kChunkFramingBytes : message_bytes;
  dilattn::client::AttendStats stats;
  absl::StatusOr<Tensor> out = c.Attend(options, in->q, in->k, in->v, &stats);
  if (!out.ok()) {
    std::cerr << "attend failed: " << out.status() << "\n";
    return 1;
  }
  double sum = 0;
  const size_t n = out->bytes.size() / dilattn::attention::DTypeSize(out->dtype);
  for (size_t i = 0; i < n; ++i)
    sum += dilattn::attention::LoadAsFloat(out->bytes.data(), out->dtype, i);
  std::printf(
      "O %s %s: stretches of %lld tokens, first output after %.3f ms, all in %.3f ms, sum "
      "%.6g\n",
      ShapeText(out->shape).c_str(), std::string(dilattn::attention::DTypeName(out->dtype)).c_str(),
      static_cast<long long>(stats.stretch_tokens), absl::ToDoubleMilliseconds(stats.first_output),
      absl::ToDoubleMilliseconds(stats.total), sum);
  return 0;
}

int Bench(const Flags& f) {
  const absl::StatusOr<Inputs> in = MakeInputs(f);
  if (!in.ok()) {
    std::cerr << "bench: " << in.status() << "\n";
    return 2;
  }
  const absl::StatusOr<inference::ModelInferRequest> made =
      dilattn::client::MakeInferRequest(in->options, in->named());
  if (!made.ok()) {
    std::cerr << "bench: " << made.status() << "\n";
    return 2;
  }
  const inference::ModelInferRequest& request = *made;
  if (request.ByteSizeLong() > static_cast<size_t>(INT_MAX)) {
    std::cerr << "bench: a request of this shape needs " << request.ByteSizeLong()
              << " bytes, more than one message can carry (2 GiB)\n";
    return 1;
  }

  std::mutex mu;
  std::vector<double> latencies_ms;
  std::map<std::string, int64_t> errors;
  std::atomic<int64_t> done{0};
  std::atomic<int> streams_ended{0};  // workers whose stream ended before the run did
  std::atomic<bool> stop{false};
  const auto start = std::chrono::steady_clock::now();
  auto record = [&](double ms, const absl::Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    if (s.ok()) {
      latencies_ms.push_back(ms);
      ++done;
    } else {
      ++errors[std::string(absl::StatusCodeToString(s.code()))];
    }
  };
  std::vector<std::thread> workers;
  for (int w = 0; w < f.concurrency; ++w) {
    workers.emplace_back([&] {
      auto c = Client::Create(f.url, f.channel);
      if (!c.ok()) return record(0, c.status());
      if (!f.stream) {
        while (!stop.load()) {
          grpc::ClientContext ctx;
          inference::ModelInferResponse resp;
          const auto t0 = std::chrono::steady_clock::now();
          const grpc::Status s = (*c)->stub().ModelInfer(&ctx, request, &resp);
          const std::chrono::duration<double, std::milli> dt =
              std::chrono::steady_clock::now() - t0;
          record(dt.count(), dilattn::client::FromGrpc(s));
        }
        return;
      }
      auto stream = (*c)->OpenStream();
      if (!stream.ok()) {
        ++streams_ended;
        return record(0, stream.status());
      }
      while (!stop.load()) {
        const auto t0 = std::chrono::steady_clock::now();
        absl::Status s = (*stream)->Send(request);
        if (s.ok()) s = (*stream)->Receive().status();
        const std::chrono::duration<double, std::milli> dt = std::chrono::steady_clock::now() - t0;
        record(dt.count(), s);
        // Only the stream's end stops this client: one request's error leaves the stream open
        // for the next, as unary mode goes on after a failed call.
        if ((*stream)->ended()) {
          ++streams_ended;
          break;
        }
      }
      (void)(*stream)->CloseSend();
    });
  }
  const double tokens_per_request = static_cast<double>(f.shape[0] * f.shape[1]);
  while (true) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    const int64_t n = done.load();
    std::fprintf(stderr, "\r%6.1fs  %8lld requests  %9.1f req/s  %12.0f tokens/s   ",
                 elapsed.count(), static_cast<long long>(n),
                 static_cast<double>(n) / elapsed.count(),
                 static_cast<double>(n) * tokens_per_request / elapsed.count());
    if (elapsed.count() >= f.duration) break;
  }
  stop.store(true);
  for (std::thread& t : workers) t.join();
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  std::fprintf(stderr, "\n");
  std::lock_guard<std::mutex> lock(mu);
  const double n = static_cast<double>(latencies_ms.size());
  // The concurrency the run kept up is less than asked where streams ended early.
  const std::string ended =
      streams_ended.load() > 0
          ? absl::StrCat(", ", streams_ended.load(), " of them stopped early: stream ended")
          : "";
  std::printf("model %s, shape %s %s, concurrency %d%s%s, %.1f s\n", f.model.c_str(),
              ShapeText(f.shape).c_str(),
              std::string(dilattn::attention::DTypeName(f.dtype)).c_str(), f.concurrency,
              f.stream ? " (streaming)" : "", ended.c_str(), elapsed.count());
  std::printf("throughput: %.1f req/s, %.0f tokens/s\n", n / elapsed.count(),
              n * tokens_per_request / elapsed.count());
  const double p50 = Percentile(latencies_ms, 50);
  const double p90 = Percentile(latencies_ms, 90);
  const double p99 = Percentile(latencies_ms, 99);
  const double max = latencies_ms.empty() ? 0.0 : latencies_ms.back();  // sorted by Percentile
  std::printf("latency ms: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", p50, p90, p99, max);
  for (const auto& [code, count] : errors) {
    std::printf("errors %s: %lld\n", code.c_str(), static_cast<long long>(count));
  }
  return errors.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  if (std::string error = Parse(argc, argv, &f); !error.empty()) {
    std::cerr << "dilattn-client: " << error << "\n" << kUsage;
    return 2;
  }
  // Asked for, the usage is the answer: stdout and success, unlike a wrong command line's.
  if (f.help) {
    std::cout << kUsage;
    return 0;
  }
  bool model_given = false;
  for (int i = 2; i < argc; ++i) model_given |= std::string(argv[i]) == "--model";
  if (f.command == "bench") return Bench(f);
  auto c = Client::Create(f.url, f.channel);
  if (!c.ok()) {
    std::cerr << c.status() << "\n";
    return 1;
  }
  if (f.command == "health") return Health(**c, f);
  if (f.command == "metadata") return Metadata(**c, f, model_given);
  if (f.command == "infer") return InferOnce(**c, f);
  if (f.command == "attend") return AttendOnce(**c, f);
  std::cerr << "dilattn-client: unknown command '" << f.command << "'\n" << kUsage;
  return 2;
}
