#include "server/metrics.h"

#include <string>

#include "CivetServer.h"
#include "absl/base/const_init.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "civetweb.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace dilattn::server {
namespace {

const prometheus::Histogram::BucketBoundaries kSecondsBuckets = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,    0.25,    0.5,    1.0,   2.5,    5.0,   10.0, 30.0,  60.0};
// Server overhead is tens to hundreds of microseconds: finer buckets there.
const prometheus::Histogram::BucketBoundaries kOverheadBuckets = {
    0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005,
    0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0};
const prometheus::Histogram::BucketBoundaries kBatchBuckets = {1, 2, 4, 8, 16, 32, 64, 128, 256};

// The health answers of each metrics port, by port: civetweb's begin_request hook is a plain
// function, and the only user data its context carries is prometheus-cpp's. The map is never
// freed, so that no civetweb thread still answering at exit finds it destroyed.
struct HealthChecks {
  std::function<bool()> live;
  std::function<bool()> ready;
};
absl::Mutex health_mu(absl::kConstInit);
absl::flat_hash_map<int, HealthChecks>* health_by_port ABSL_GUARDED_BY(health_mu) = nullptr;

void SetHealthChecks(int port, HealthChecks checks) {
  absl::MutexLock lock(&health_mu);
  if (health_by_port == nullptr) health_by_port = new absl::flat_hash_map<int, HealthChecks>();
  if (checks.live == nullptr) {
    health_by_port->erase(port);
  } else {
    (*health_by_port)[port] = std::move(checks);
  }
}

// KServe's HTTP health paths; every other request goes on to prometheus-cpp's handlers.
int AnswerHealth(mg_connection* conn) {
  const mg_request_info* request = mg_get_request_info(conn);
  const absl::string_view path = request->local_uri != nullptr ? request->local_uri : "";
  const bool live_path = path == "/v2/health/live";
  if (!live_path && path != "/v2/health/ready") return 0;
  const absl::string_view method =
      request->request_method != nullptr ? request->request_method : "";
  if (method != "GET" && method != "HEAD") {
    mg_printf(conn,
              "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Length: 0\r\n\r\n");
    return 405;
  }
  bool yes = false;
  {
    // Held through the call, so that RemoveSources (which takes it) returns only once no check
    // of the server being torn down runs.
    absl::MutexLock lock(&health_mu);
    if (health_by_port != nullptr) {
      if (auto it = health_by_port->find(request->server_port); it != health_by_port->end()) {
        yes = live_path ? it->second.live() : it->second.ready();
      }
    }
  }
  const absl::string_view body =
      yes ? (live_path ? "live\n" : "ready\n") : (live_path ? "not live\n" : "not ready\n");
  const int status = yes ? 200 : 400;
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            "Cache-Control: no-store\r\n\r\n",
            status, yes ? "OK" : "Bad Request", static_cast<int>(body.size()));
  if (method == "GET") mg_write(conn, body.data(), body.size());
  return status;
}

const char* const kReasons[4] = {"REJECTED", "CANCELED", "BACKEND", "OTHER"};
// By ExecutionPath.
const char* const kPaths[kExecutionPaths] = {"gpu", "gpu_padded", "cpu", "split"};

// The pool events exported, each with its count: the metric's help text is made from this list
// too, so it names every event a scrape can show.
struct PoolEvent {
  const char* name;
  uint64_t memory::BufferPoolStats::*count;
};
constexpr PoolEvent kPoolEvents[] = {
    {"hit", &memory::BufferPoolStats::hits},
    {"miss", &memory::BufferPoolStats::misses},
    {"wait", &memory::BufferPoolStats::waits},
    {"timeout", &memory::BufferPoolStats::timeouts},
    {"oversize", &memory::BufferPoolStats::oversized},
    {"eviction", &memory::BufferPoolStats::evictions},
    {"idle_release", &memory::BufferPoolStats::idle_releases},
    {"allocation_failure", &memory::BufferPoolStats::allocation_failures},
};

std::string PoolEventsHelp() {
  std::string help = "Buffer pool events:";
  for (const PoolEvent& e : kPoolEvents) {
    absl::StrAppend(&help, &e == kPoolEvents ? " " : ", ", e.name);
  }
  return help;
}

}  // namespace

// Reads every registered pool's statistics and the engine threads' times when Prometheus
// scrapes, so the numbers are exact at that moment without a background updater.
class Metrics::SourceCollector : public prometheus::Collectable {
 public:
  void Add(const memory::BufferPool* pool) {
    absl::MutexLock lock(&mu_);
    pools_.push_back(pool);
  }
  void SetEngine(std::function<std::vector<EngineThreadSeconds>()> read) {
    absl::MutexLock lock(&mu_);
    engine_ = std::move(read);
  }
  void Clear() {
    absl::MutexLock lock(&mu_);
    pools_.clear();
    engine_ = nullptr;
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily bytes{"dilattn_buffer_pool_bytes",
                                   "Bytes of a buffer pool by state: in_use (leased), held "
                                   "(leased plus cached), high_water (max in_use), cap",
                                   prometheus::MetricType::Gauge, {}};
    prometheus::MetricFamily leases{"dilattn_buffer_pool_leases",
                                    "Buffers currently leased from a pool",
                                    prometheus::MetricType::Gauge, {}};
    prometheus::MetricFamily events{
        "dilattn_buffer_pool_events_total", PoolEventsHelp(), prometheus::MetricType::Counter, {}};
    absl::MutexLock lock(&mu_);
    for (const memory::BufferPool* pool : pools_) {
      const memory::BufferPoolStats s = pool->stats();
      auto gauge = [&](prometheus::MetricFamily& f, const char* state, double v) {
        prometheus::ClientMetric m;
        m.label = {{"pool", pool->name()}};
        if (state != nullptr) m.label.push_back({"state", state});
        m.gauge.value = v;
        f.metric.push_back(m);
      };
      gauge(bytes, "in_use", static_cast<double>(s.bytes_in_use));
      gauge(bytes, "held", static_cast<double>(s.bytes_held));
      gauge(bytes, "high_water", static_cast<double>(s.high_water_bytes));
      gauge(bytes, "cap", static_cast<double>(pool->byte_cap()));
      gauge(leases, nullptr, static_cast<double>(s.leases_outstanding));
      for (const PoolEvent& e : kPoolEvents) {
        prometheus::ClientMetric m;
        m.label = {{"pool", pool->name()}, {"event", e.name}};
        m.counter.value = static_cast<double>(s.*e.count);
        events.metric.push_back(m);
      }
    }
    std::vector<prometheus::MetricFamily> out = {bytes, leases, events};
    if (engine_ != nullptr) {
      prometheus::MetricFamily engine{
          "dilattn_engine_seconds_total",
          "Seconds each device's engine thread spent, by phase: idle (no work), start (planning, "
          "leasing and issuing jobs; the CPU path computes there), wait (for the device), "
          "complete (statistics, requests handed to the completion threads), gang "
          "(sequence-parallel runs), release (idle "
          "memory and heap trims), other",
          prometheus::MetricType::Counter,
          {}};
      prometheus::MetricFamily failed{
          "dilattn_device_failed",
          "1 once a CUDA error that leaves the process's GPUs unusable showed on this device: "
          "the server stopped using every GPU, answers UNAVAILABLE and reports NOT_SERVING "
          "until it is restarted; else 0",
          prometheus::MetricType::Gauge,
          {}};
      for (const EngineThreadSeconds& t : engine_()) {
        for (const auto& [phase, seconds] : t.phases) {
          prometheus::ClientMetric m;
          m.label = {{"device", t.device}, {"phase", phase}};
          m.counter.value = seconds;
          engine.metric.push_back(m);
        }
        prometheus::ClientMetric m;
        m.label = {{"device", t.device}};
        m.gauge.value = t.failed ? 1 : 0;
        failed.metric.push_back(m);
      }
      out.push_back(engine);
      out.push_back(failed);
    }
    return out;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<const memory::BufferPool*> pools_ ABSL_GUARDED_BY(mu_);
  std::function<std::vector<EngineThreadSeconds>()> engine_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& bind_address) {
  std::unique_ptr<Metrics> m(new Metrics());
  m->registry_ = std::make_shared<prometheus::Registry>();
  m->sources_ = std::make_shared<SourceCollector>();
  prometheus::Registry& r = *m->registry_;
  auto counter = [&](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(r);
  };
  m->success_ = counter("nv_inference_request_success", "Number of successful inference requests, all batch sizes");
  m->failure_ = counter("nv_inference_request_failure", "Number of failed inference requests, all batch sizes");
  m->inference_count_ = counter("nv_inference_count", "Number of inferences performed (a request of batch B counts B)");
  m->exec_count_ = counter("nv_inference_exec_count", "Number of model executions performed (batches)");
  m->executions_ = counter(
      "dilattn_executions_total",
      "Executions (batches) by where they computed: gpu; gpu_padded (a head dim without a kernel, "
      "padded to the next that has one); cpu (the CPU path: a CPU server, or on a GPU server a "
      "shape its kernels do not take); split (sequence parallelism across GPUs)");
  m->request_us_ = counter("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds");
  m->queue_us_ = counter("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds");
  m->compute_input_us_ = counter("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds");
  m->compute_infer_us_ = counter("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds");
  m->compute_output_us_ = counter("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds");
  m->pending_ = &prometheus::BuildGauge()
                     .Name("nv_inference_pending_request_count")
                     .Help("Instantaneous number of pending requests awaiting execution per-model")
                     .Register(r);
  auto histogram = [&](const char* name, const char* help) {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(r);
  };
  m->request_seconds_ = histogram("dilattn_request_duration_seconds", "Server-side time of successful requests, arrival to response");
  m->queue_seconds_ = histogram("dilattn_queue_duration_seconds", "Time requests wait in the model's queue");
  m->compute_seconds_ = histogram("dilattn_compute_duration_seconds", "Time of each execution: copies in, kernel, copies out");
  m->overhead_seconds_ = histogram("dilattn_request_overhead_seconds", "Server-side time of successful requests outside the kernel: request minus compute-infer time");
  m->batch_size_ = histogram("dilattn_batch_size", "Sequences per execution");
  m->streams_.open = &prometheus::BuildGauge()
                          .Name("dilattn_native_streams_open")
                          .Help("dilattn.v1 Attend streams open now")
                          .Register(r)
                          .Add({});
  prometheus::Family<prometheus::Counter>* stream_bytes = counter(
      "dilattn_native_stream_bytes_total", "Tensor bytes carried by dilattn.v1 Attend streams");
  m->streams_.bytes_in = &stream_bytes->Add({{"direction", "in"}});
  m->streams_.bytes_out = &stream_bytes->Add({{"direction", "out"}});
  if (!bind_address.empty()) {
    try {
      // CivetServer copies them.
      CivetCallbacks callbacks;
      callbacks.begin_request = AnswerHealth;
      m->exposer_ = std::make_unique<prometheus::Exposer>(bind_address, 2, &callbacks);
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("cannot serve metrics on ", bind_address, ": ", e.what()));
    }
    m->exposer_->RegisterCollectable(m->registry_);
    m->exposer_->RegisterCollectable(m->sources_);
  }
  return m;
}

Metrics::~Metrics() {
  if (exposer_ != nullptr) SetHealthChecks(port(), {});
}

int Metrics::port() const {
  // Not 0, which --metrics-port reads as "pick a free port".
  if (exposer_ == nullptr) return -1;
  const std::vector<int> ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

void Metrics::AddPool(const memory::BufferPool* pool) { sources_->Add(pool); }

void Metrics::SetEngineTimes(std::function<std::vector<EngineThreadSeconds>()> read) {
  sources_->SetEngine(std::move(read));
}

void Metrics::RemoveSources() {
  sources_->Clear();
  if (exposer_ != nullptr) SetHealthChecks(port(), {});
}

void Metrics::SetHealth(std::function<bool()> live, std::function<bool()> ready) {
  if (exposer_ != nullptr) SetHealthChecks(port(), {std::move(live), std::move(ready)});
}

ModelMetrics* Metrics::ForModel(const std::string& model, const std::string& version) {
  const prometheus::Labels labels = {{"model", model}, {"version", version}};
  auto mm = std::make_unique<ModelMetrics>();
  mm->success = &success_->Add(labels);
  for (int i = 0; i < 4; ++i) {
    prometheus::Labels with_reason = labels;
    with_reason["reason"] = kReasons[i];
    mm->failure[i] = &failure_->Add(with_reason);
  }
  mm->inference_count = &inference_count_->Add(labels);
  mm->exec_count = &exec_count_->Add(labels);
  for (int i = 0; i < kExecutionPaths; ++i) {
    prometheus::Labels with_path = labels;
    with_path["path"] = kPaths[i];
    mm->executions[i] = &executions_->Add(with_path);
  }
  mm->request_us = &request_us_->Add(labels);
  mm->queue_us = &queue_us_->Add(labels);
  mm->compute_input_us = &compute_input_us_->Add(labels);
  mm->compute_infer_us = &compute_infer_us_->Add(labels);
  mm->compute_output_us = &compute_output_us_->Add(labels);
  mm->pending = &pending_->Add(labels);
  mm->request_seconds = &request_seconds_->Add(labels, kSecondsBuckets);
  mm->queue_seconds = &queue_seconds_->Add(labels, kSecondsBuckets);
  mm->compute_seconds = &compute_seconds_->Add(labels, kSecondsBuckets);
  mm->overhead_seconds = &overhead_seconds_->Add(labels, kOverheadBuckets);
  mm->batch_size = &batch_size_->Add(labels, kBatchBuckets);
  absl::MutexLock lock(&mu_);
  models_.push_back(std::move(mm));
  return models_.back().get();
}

}  // namespace dilattn::server
