#pragma once

// Prometheus metrics: Triton's nv_inference_* names with model/version labels where Triton has
// the metric, histograms of request, queue and compute time and of batch size, and buffer-pool
// gauges read at scrape time. Served in the text format on /metrics.

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/memory/buffer_pool.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/request.h"

namespace dilattn::server {

// Failure reasons, as Triton labels nv_inference_request_failure.
enum class FailureReason { kRejected, kCanceled, kBackend, kOther };

struct ModelMetrics {
  prometheus::Counter* success;
  prometheus::Counter* failure[4];  // by FailureReason
  prometheus::Counter* inference_count;
  prometheus::Counter* exec_count;
  prometheus::Counter* executions[kExecutionPaths];  // by ExecutionPath
  prometheus::Counter* request_us;
  prometheus::Counter* queue_us;
  prometheus::Counter* compute_input_us;
  prometheus::Counter* compute_infer_us;
  prometheus::Counter* compute_output_us;
  prometheus::Gauge* pending;
  prometheus::Histogram* request_seconds;
  prometheus::Histogram* queue_seconds;
  prometheus::Histogram* compute_seconds;
  prometheus::Histogram* overhead_seconds;
  prometheus::Histogram* batch_size;
};

// The native stream (dilattn.v1): streams open now, and the tensor bytes they carried.
struct StreamMetrics {
  prometheus::Gauge* open;
  prometheus::Counter* bytes_in;
  prometheus::Counter* bytes_out;
};

// Seconds one engine thread has spent in each phase since start-up (dilattn_engine_seconds_total).
struct EngineThreadSeconds {
  std::string device;
  std::vector<std::pair<std::string, double>> phases;  // phase name, seconds
  bool failed = false;  // the error that stopped the GPUs showed here (Engine::DeviceLost)
};

class Metrics {
 public:
  // Serves /metrics on bind_address ("0.0.0.0:8002"; port 0 picks a free one). Empty: registry
  // only, nothing served (tests).
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& bind_address);
  ~Metrics();

  int port() const;  // -1 when not serving (Create with an empty address)
  ModelMetrics* ForModel(const std::string& model, const std::string& version);
  void AddPool(const memory::BufferPool* pool);
  // Read at every scrape; replaces the reader set before.
  void SetEngineTimes(std::function<std::vector<EngineThreadSeconds>()> read);
  // Before the engine and its pools are destroyed: /metrics keeps serving while the server is
  // torn down. Health answers "not live" from then on.
  void RemoveSources();
  // Answers KServe's HTTP health paths on the metrics port, for HTTP probes (Kubernetes' gRPC
  // probe cannot speak TLS): GET /v2/health/live and /v2/health/ready, 200 while `live()` or
  // `ready()` is true, 400 otherwise (KServe: a 4xx is false). Both are called on civetweb's
  // threads, until RemoveSources. Before this is set, both answer 400.
  void SetHealth(std::function<bool()> live, std::function<bool()> ready);
  StreamMetrics* streams() { return &streams_; }
  prometheus::Registry& registry() { return *registry_; }

 private:
  Metrics() = default;
  class SourceCollector;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<SourceCollector> sources_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<ModelMetrics>> models_ ABSL_GUARDED_BY(mu_);
  StreamMetrics streams_{};

  prometheus::Family<prometheus::Counter>* success_ = nullptr;
  prometheus::Family<prometheus::Counter>* failure_ = nullptr;
  prometheus::Family<prometheus::Counter>* inference_count_ = nullptr;
  prometheus::Family<prometheus::Counter>* exec_count_ = nullptr;
  prometheus::Family<prometheus::Counter>* executions_ = nullptr;
  prometheus::Family<prometheus::Counter>* request_us_ = nullptr;
  prometheus::Family<prometheus::Counter>* queue_us_ = nullptr;
  prometheus::Family<prometheus::Counter>* compute_input_us_ = nullptr;
  prometheus::Family<prometheus::Counter>* compute_infer_us_ = nullptr;
  prometheus::Family<prometheus::Counter>* compute_output_us_ = nullptr;
  prometheus::Family<prometheus::Gauge>* pending_ = nullptr;
  prometheus::Family<prometheus::Histogram>* request_seconds_ = nullptr;
  prometheus::Family<prometheus::Histogram>* queue_seconds_ = nullptr;
  prometheus::Family<prometheus::Histogram>* compute_seconds_ = nullptr;
  prometheus::Family<prometheus::Histogram>* overhead_seconds_ = nullptr;
  prometheus::Family<prometheus::Histogram>* batch_size_ = nullptr;
};

}  // namespace dilattn::server
