// Closed-loop gRPC load generator in C++ for the serving benchmark (bench/bench_serving.py).
//
// Why C++: the Python asyncio client spends about 250 us of CPU per call, so on its one
// core it saturates near 4,000 calls/s, below what the servers under test can answer; this
// one spends a few tens of microseconds. Same protocol as the Python load generator: one
// channel (one HTTP/2 connection), `concurrency` calls in flight, raw request bytes sent
// round robin from a file of 4-byte little-endian length-prefixed messages, every non-OK
// status counted as an error. Uses gRPC's generic stub (no generated code).
//
//   loadgen --target HOST:PORT --method /pkg.Service/Method --requests FILE
//           [--metadata KEY=VALUE ...] --concurrency N --seconds S --warmup W
//           [--server-pgid PGID]
//
// Prints one JSON line with the same fields as the Python load generator's `_run_level`.
// Build: g++ -O2 -std=c++17 loadgen.cc $(pkg-config --cflags --libs grpc++) -o loadgen

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

const char* kCodeNames[] = {
    "OK",        "CANCELLED",          "UNKNOWN",        "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED", "NOT_FOUND",  "ALREADY_EXISTS", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};

struct Call {
  grpc::ClientContext context;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  Clock::time_point start;
};

// user + system CPU seconds of every process in process group `pgid` (as bench_serving's
// _group_cpu_seconds).
double GroupCpuSeconds(int pgid) {
  if (pgid <= 0) return 0.0;
  double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  double total = 0.0;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return 0.0;
  while (dirent* entry = readdir(proc)) {
    if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
    std::ifstream stat(std::string("/proc/") + entry->d_name + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    size_t close = text.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream fields(text.substr(close + 1));
    std::vector<std::string> f(std::istream_iterator<std::string>{fields},
                               std::istream_iterator<std::string>());
    if (f.size() < 13 || std::stoi(f[2]) != pgid) continue;  // state ppid pgrp ...
    total += (std::stod(f[11]) + std::stod(f[12])) / ticks;  // utime, stime
  }
  closedir(proc);
  return total;
}

double ProcessCpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
         (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1e-6;
}

std::vector<std::string> ReadRequests(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> requests;
  size_t at = 0;
  while (at + 4 <= data.size()) {
    uint32_t size = static_cast<uint8_t>(data[at]) | static_cast<uint8_t>(data[at + 1]) << 8 |
                    static_cast<uint8_t>(data[at + 2]) << 16 |
                    static_cast<uint32_t>(static_cast<uint8_t>(data[at + 3])) << 24;
    requests.push_back(data.substr(at + 4, size));
    at += 4 + size;
  }
  return requests;
}

double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return -1.0;
  size_t index = std::min(sorted.size() - 1, static_cast<size_t>(q * sorted.size()));
  return sorted[index] * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  std::string target, method, request_file;
  std::vector<std::pair<std::string, std::string>> metadata;
  int concurrency = 1, server_pgid = 0;
  double seconds = 5.0, warmup = 1.0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (arg == "--target") target = next();
    else if (arg == "--method") method = next();
    else if (arg == "--requests") request_file = next();
    else if (arg == "--concurrency") concurrency = std::stoi(next());
    else if (arg == "--seconds") seconds = std::stod(next());
    else if (arg == "--warmup") warmup = std::stod(next());
    else if (arg == "--server-pgid") server_pgid = std::stoi(next());
    else if (arg == "--metadata") {
      std::string item = next();
      size_t eq = item.find('=');
      metadata.emplace_back(item.substr(0, eq), eq == std::string::npos ? "" : item.substr(eq + 1));
    } else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      return 2;
    }
  }
  std::vector<std::string> raw = ReadRequests(request_file);
  if (target.empty() || method.empty() || raw.empty() || concurrency < 1) {
    std::fprintf(stderr, "need --target, --method, a non-empty --requests file, --concurrency\n");
    return 2;
  }
  std::vector<grpc::ByteBuffer> requests;
  for (const std::string& r : raw) {
    grpc::Slice slice(r.data(), r.size());
    requests.emplace_back(&slice, 1);
  }

  grpc::ChannelArguments args;
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue queue;
  size_t turn = 0;

  auto start_call = [&]() {
    auto* call = new Call;
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    for (const auto& [key, value] : metadata) call->context.AddMetadata(key, value);
    call->start = Clock::now();
    call->reader = stub.PrepareUnaryCall(&call->context, method, requests[turn++ % requests.size()],
                                         &queue);
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call);
  };

  std::vector<double> latencies;
  latencies.reserve(1 << 20);
  std::map<std::string, long> errors;
  bool measuring = false;
  double server_cpu = 0.0, client_cpu = 0.0;
  Clock::time_point began, started = Clock::now();
  auto warm_end = started + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(warmup));
  auto end = warm_end + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(seconds));
  for (int i = 0; i < concurrency; ++i) start_call();
  int in_flight = concurrency;
  bool stopping = false;
  double elapsed = 0.0;
  while (in_flight > 0) {
    void* tag;
    bool ok;
    if (!queue.Next(&tag, &ok)) break;
    auto* call = static_cast<Call*>(tag);
    Clock::time_point now = Clock::now();
    if (measuring) {
      if (call->status.ok()) {
        latencies.push_back(std::chrono::duration<double>(now - call->start).count());
      } else {
        int code = call->status.error_code();
        errors[code >= 0 && code <= 16 ? kCodeNames[code] : "OTHER"] += 1;
      }
    }
    delete call;
    --in_flight;
    if (!measuring && !stopping && now >= warm_end) {
      measuring = true;
      server_cpu = GroupCpuSeconds(server_pgid);
      client_cpu = ProcessCpuSeconds();
      began = now;
    } else if (measuring && now >= end) {
      measuring = false;
      stopping = true;
      elapsed = std::chrono::duration<double>(now - began).count();
      client_cpu = ProcessCpuSeconds() - client_cpu;
      server_cpu = GroupCpuSeconds(server_pgid) - server_cpu;
    }
    if (!stopping) {
      start_call();
      ++in_flight;
    }
  }
  std::sort(latencies.begin(), latencies.end());
  double mean = 0.0;
  for (double l : latencies) mean += l;
  size_t count = latencies.size();
  mean = count ? mean / count * 1e3 : -1.0;
  long error_total = 0;
  std::ostringstream codes;
  codes << "{";
  for (const auto& [name, n] : errors) {
    codes << (error_total ? ", " : "") << "\"" << name << "\": " << n;
    error_total += n;
  }
  codes << "}";
  double rps = elapsed > 0 ? count / elapsed : 0.0;
  std::printf(
      "{\"concurrency\": %d, \"requests\": %zu, \"rps\": %.3f, \"p50_ms\": %.4f, "
      "\"p99_ms\": %.4f, \"p999_ms\": %.4f, \"max_ms\": %.4f, \"mean_ms\": %.4f, \"errors\": %ld, "
      "\"error_codes\": %s, \"server_cpu_s\": %.3f, \"client_cpu_s\": %.3f, "
      "\"seconds\": %.3f, \"client\": \"c++ grpc %s\"}\n",
      concurrency, count, rps, Percentile(latencies, 0.50), Percentile(latencies, 0.99),
      Percentile(latencies, 0.999), count ? latencies.back() * 1e3 : -1.0, mean, error_total,
      codes.str().c_str(), server_cpu, client_cpu, elapsed, grpc::Version().c_str());
  return 0;
}
