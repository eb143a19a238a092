// attnbench report RESULTS... --out DIR: a Markdown summary (DIR/report.md)
// with per-suite tables and the figures of plots/plot.py embedded
// (docs/plots.md). Without python3 + matplotlib it says so and still writes
// every table.
#include <fmt/format.h>
#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <vector>

#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/results.hpp"

namespace attnbench::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct ReportArgs {
  std::vector<std::string> inputs;
  std::string out;
  bool no_plots = false;
  double budget_s = 0;  // > 0: the "blocks per step" table of each suite
};

// --- formatting -----------------------------------------------------------------

/// Markdown table cells: no pipes or newlines.
std::string cell(std::string s) {
  std::string out;
  for (char c : s) {
    if (c == '|')
      out += "\\|";
    else if (c == '\n')
      out += ' ';
    else
      out += c;
  }
  return out;
}

std::string seconds(double s) {
  if (s >= 1) return fmt::format("{:.3g} s", s);
  if (s >= 1e-3) return fmt::format("{:.3g} ms", s * 1e3);
  if (s >= 1e-6) return fmt::format("{:.3g} µs", s * 1e6);
  return fmt::format("{:.3g} ns", s * 1e9);
}

std::string bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.3g} {}", b, units[u]);
}

std::string value_text(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

std::optional<double> number(const json& obj, const char* key) {
  if (obj.is_object() && obj.contains(key) && obj[key].is_number()) return obj[key].get<double>();
  return std::nullopt;
}

/// "✅ 5/5 · max_rel 1.2e-07": checks passed and the worst equivalence error.
std::string checks_cell(const json& r) {
  if (!r.contains("checks") || r["checks"].empty()) return "–";
  int passed = 0, total = 0;
  double worst = -1;
  for (const auto& [name, c] : r["checks"].items()) {
    ++total;
    passed += c["passed"].get<bool>();
    if (name.rfind("equivalence", 0) == 0)
      if (auto m = number(c, "max_rel")) worst = std::max(worst, *m);
  }
  std::string s = fmt::format("{} {}/{}", passed == total ? "✅" : "❌", passed, total);
  if (worst >= 0) s += fmt::format(" · max_rel {:.2g}", worst);
  return s;
}

std::string status_cell(const json& r) {
  const auto status = r["status"].get<std::string>();
  const auto reason = r.value("reason", std::string());
  if (status == "ok") return "ok";
  const std::string label = status == "failed" ? "**failed**" : "skipped";
  return reason.empty() ? label : label + ": " + cell(reason);
}

std::string memory_cell(const json& b) {
  double m = -1;
  for (const char* k : {"peak_bytes", "heap_peak_bytes", "rss_peak_bytes", "device_bytes"})
    if (auto v = number(b, k)) m = std::max(m, *v);
  return m < 0 ? "–" : bytes(m);
}

// --- tables ----------------------------------------------------------------------

struct Loaded {
  std::string path;
  json doc;
};

void context_table(std::ostringstream& md, const std::vector<const Loaded*>& files) {
  md << "| file | host | CPU | threads | peak GFLOP/s | memory | CUDA device | git | date |\n"
     << "|---|---|---|---:|---:|---:|---|---|---|\n";
  for (const Loaded* f : files) {
    const json& c = f->doc["context"];
    const json& s = f->doc["suite"];
    std::string name = f->path;
    if (s.contains("shard") && s["shard"] != "1/1") name += " (shard " + value_text(s["shard"]) + ")";
    if (s.contains("complete") && s["complete"] == false) name += " (interrupted)";
    auto text = [&](const char* k) { return c.contains(k) && !c[k].is_null() ? cell(value_text(c[k])) : "–"; };
    const auto peak = number(c, "peak_gflops");
    const auto mem = number(c, "memory_bytes");
    md << fmt::format("| `{}` | {} | {} | {} | {} | {} | {} | `{}` | {} |\n", cell(name), text("host"),
                      text("cpu_model"), text("threads"), peak ? fmt::format("{:.0f}", *peak) : "–",
                      mem ? bytes(*mem) : "–", text("cuda_device"), text("git_sha"), text("date"));
  }
  md << "\n";
}

void variant_table(std::ostringstream& md, const std::string& variant, const std::vector<const json*>& recs) {
  // Shape parameters that vary get a column; the constant ones go in one line.
  std::map<std::string, std::set<std::string>> values;
  for (const json* r : recs)
    for (const auto& [k, v] : (*r)["shape"].items()) values[k].insert(v.dump());
  std::vector<std::string> varying;
  std::string fixed;
  for (const auto& [k, vs] : values) {
    if (vs.size() > 1)
      varying.push_back(k);
    else
      fixed += (fixed.empty() ? "" : ", ") + fmt::format("{} = {}", k, value_text((*recs.front())["shape"][k]));
  }
  md << "### " << variant << "\n\n";
  if (!fixed.empty()) md << "Fixed shape: " << cell(fixed) << ".\n\n";
  md << "| impl | dtype | pass |";
  for (const auto& k : varying) md << " " << k << " |";
  md << " status | checks | median time | GFLOP/s | % peak | memory |\n|---|---|---|";
  for (size_t i = 0; i < varying.size(); ++i) md << "---:|";
  md << "---|---|---:|---:|---:|---:|\n";
  for (const json* rp : recs) {
    const json& r = *rp;
    md << "| " << cell(r["impl"].get<std::string>()) << " | " << cell(r["dtype"].get<std::string>()) << " | "
       << cell(r["pass"].get<std::string>()) << " |";
    for (const auto& k : varying) md << " " << (r["shape"].contains(k) ? cell(value_text(r["shape"][k])) : "–") << " |";
    md << " " << status_cell(r) << " | " << checks_cell(r) << " |";
    if (r.contains("bench") && r["bench"].is_object()) {
      const json& b = r["bench"];
      const auto median = number(b, "median_s");
      const auto gflops = number(b, "gflops");
      const auto pct = number(b, "pct_peak");
      md << " " << (median ? seconds(*median) : "–") << " | " << (gflops ? fmt::format("{:.3g}", *gflops) : "–")
         << " | " << (pct ? fmt::format("{:.1f}%", *pct) : "–") << " | " << memory_cell(b) << " |\n";
    } else {
      md << " – | – | – | – |\n";
    }
  }
  md << "\n";
}

/// The seed's question "how many blocks of each kind fit a time budget per step at a given N":
/// per (variant, impl, dtype, pass and every shape parameter but N) a row, per N a column, each
/// cell floor(budget / median time) with the time beside it.
void budget_table(std::ostringstream& md, const std::vector<const json*>& recs, double budget_s) {
  std::map<std::string, std::map<int64_t, double>> rows;
  std::set<int64_t> ns;
  for (const json* rp : recs) {
    const json& r = *rp;
    if (!r.contains("bench") || !r["bench"].is_object() || !r["shape"].contains("N")) continue;
    const auto median = number(r["bench"], "median_s");
    if (!median || *median <= 0 || !r["shape"]["N"].is_number_integer()) continue;
    json rest = r["shape"];
    rest.erase("N");
    std::string others;
    for (const auto& [k, v] : rest.items()) others += (others.empty() ? "" : ", ") + k + " " + value_text(v);
    const std::string key = fmt::format("{} | {} | {} | {} | {}", cell(r["variant"].get<std::string>()),
                                        cell(r["impl"].get<std::string>()), cell(r["dtype"].get<std::string>()),
                                        cell(r.value("pass", std::string("fwd"))), cell(others));
    const int64_t N = r["shape"]["N"].get<int64_t>();
    rows[key][N] = *median;
    ns.insert(N);
  }
  if (rows.empty()) return;
  md << "### Blocks per " << seconds(budget_s) << " step\n\n"
     << "How many calls of each fit the budget at each N (floor(budget / median time); the median in brackets).\n\n"
     << "| variant | impl | dtype | pass | other parameters |";
  for (int64_t N : ns) md << " N " << N << " |";
  md << "\n|---|---|---|---|---|";
  for (size_t i = 0; i < ns.size(); ++i) md << "---:|";
  md << "\n";
  for (const auto& [key, by_n] : rows) {
    md << "| " << key << " |";
    for (int64_t N : ns) {
      const auto it = by_n.find(N);
      if (it == by_n.end())
        md << " – |";
      else
        md << fmt::format(" {} ({}) |", int64_t(std::floor(budget_s / it->second)), seconds(it->second));
    }
    md << "\n";
  }
  md << "\n";
}

// --- figures ---------------------------------------------------------------------

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

int run_shell(const std::string& cmd) {
  const int rc = std::system(cmd.c_str());
  return rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : 127;
}

/// $ATTNBENCH_PYTHON when set, else the first of python3, /usr/bin/python3
/// that imports matplotlib; or nothing, with `why` saying what was missing.
std::optional<std::string> find_python(std::string& why) {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("ATTNBENCH_PYTHON"); env && *env)
    candidates.push_back(env);
  else
    candidates = {"python3", "/usr/bin/python3"};
  std::vector<std::string> without_matplotlib;
  for (const auto& py : candidates) {
    const int rc = run_shell(shell_quote(py) + " -c 'import matplotlib' >/dev/null 2>&1");
    if (rc == 0) return py;
    if (rc != 127) without_matplotlib.push_back(py);
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
  };
  why = without_matplotlib.empty() ? "no Python interpreter found (tried " + join(candidates) + ")"
                                   : "matplotlib is not installed for " + join(without_matplotlib) +
                                         " (install python3-matplotlib: scripts/setup.sh, or set ATTNBENCH_PYTHON)";
  return std::nullopt;
}

std::string last_line(const fs::path& file) {
  std::ifstream f(file);
  std::string line, last;
  while (std::getline(f, line))
    if (!line.empty()) last = line;
  return last;
}

/// Runs plots/plot.py into `dir` and returns the Markdown of its figures, or
/// a note saying why there are none.
std::string figures_section(const ReportArgs& a) {
  std::ostringstream md;
  md << "## Figures\n\n";
  const fs::path script = fs::path(ATTNBENCH_SOURCE_DIR) / "plots" / "plot.py";
  std::string why;
  if (a.no_plots) {
    md << "> Figures not drawn (`--no-plots`).\n";
    return md.str();
  }
  if (!fs::exists(script)) {
    md << "> **Note:** no figures: " << script.string() << " is missing.\n";
    return md.str();
  }
  const auto python = find_python(why);
  if (!python) {
    md << "> **Note:** no figures: " << why << ". The tables above are complete.\n";
    std::fprintf(stderr, "attnbench report: no figures: %s\n", why.c_str());
    return md.str();
  }
  const fs::path log = fs::path(a.out) / "plot.log";
  std::string cmd = shell_quote(*python) + " " + shell_quote(script.string());
  for (const auto& in : a.inputs) cmd += " " + shell_quote(in);
  cmd += " --out " + shell_quote(a.out) + " >" + shell_quote(log.string()) + " 2>&1";
  if (const int rc = run_shell(cmd); rc != 0) {
    const std::string err = last_line(log);
    md << "> **Note:** plotting failed (exit " << rc << "): `" << cell(err) << "` (full log: plot.log).\n";
    std::fprintf(stderr, "attnbench report: plotting failed: %s\n", err.c_str());
    return md.str();
  }
  std::ifstream f(fs::path(a.out) / "figures.json");
  json manifest;
  try {
    manifest = json::parse(f).at("figures");
  } catch (const json::exception&) {
    md << "> **Note:** plot.py wrote no readable figures.json.\n";
    return md.str();
  }
  if (manifest.empty()) md << "No figure types have data in these results.\n";
  std::string current;
  for (const auto& fig : manifest) {
    const auto variant = fig.value("variant", std::string());
    if (variant != current) {
      md << "### " << variant << "\n\n";
      current = variant;
    }
    const auto title = fig.value("title", std::string());
    md << fmt::format("![{}]({})\n\n*{}* ([PDF]({}))\n\n", cell(title), fig.value("png", std::string()), cell(title),
                      fig.value("pdf", std::string()));
  }
  return md.str();
}

// --- report ----------------------------------------------------------------------

void write_text_atomic(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp);
    f << text;
    f.flush();
    if (!f) throw InputError(path.string() + ": cannot write (" + std::strerror(errno) + ")");
  }
  fs::rename(tmp, path);
}

/// Files as given; a folder stands for the *.json files in it (sorted).
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const auto& in : inputs) {
    if (!fs::is_directory(in)) {
      files.push_back(in);
      continue;
    }
    std::vector<std::string> found;
    for (const auto& e : fs::directory_iterator(in))
      if (e.path().extension() == ".json" && e.path().filename() != "figures.json") found.push_back(e.path().string());
    std::sort(found.begin(), found.end());
    if (found.empty()) throw InputError(in + ": no results files (*.json) in this folder");
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

int report(ReportArgs a) {
  a.inputs = expand_inputs(a.inputs);
  std::vector<Loaded> files;
  for (const auto& p : a.inputs) files.push_back({p, load_results(p)});
  std::error_code ec;
  fs::create_directories(a.out, ec);
  if (ec) throw InputError(a.out + ": cannot create the output folder (" + ec.message() + ")");

  // Suites in the order first seen; several files of one suite (shards) share a section.
  std::vector<std::string> order;
  std::map<std::string, std::vector<const Loaded*>> by_suite;
  for (const auto& f : files) {
    const auto name = f.doc["suite"].value("name", std::string("(unnamed)"));
    if (!by_suite.count(name)) order.push_back(name);
    by_suite[name].push_back(&f);
  }

  // A case in several files (a run and its merge, say) is counted and shown
  // once, at its first place, with the last file's record.
  struct SuiteCases {
    std::vector<const json*> cases;
    size_t records = 0;
  };
  std::map<std::string, SuiteCases> suites;
  json all = json::array();
  for (const auto& name : order) {
    SuiteCases& sc = suites[name];
    std::map<std::string, const json*> latest;
    for (const Loaded* f : by_suite[name])
      for (const auto& r : f->doc["records"]) latest[record_key(r)] = &r, ++sc.records;
    std::set<std::string> shown;
    for (const Loaded* f : by_suite[name])
      for (const auto& r : f->doc["records"])
        if (shown.insert(record_key(r)).second) {
          sc.cases.push_back(latest[record_key(r)]);
          all.push_back(*sc.cases.back());
        }
  }

  std::ostringstream md;
  md << "# attnbench report\n\n";
  const json total = summarize(all);
  md << fmt::format("{} results file(s), {} suite(s), {} cases: {} ok, {} failed, {} skipped; {} failed checks.\n\n",
                    files.size(), order.size(), all.size(), total["ok"].get<int>(), total["failed"].get<int>(),
                    total["skipped"].get<int>(), total["checks_failed"].get<int>());
  md << "Times are medians over repetitions; GFLOP/s count dense-equivalent FLOPs; % peak is of the machine's "
        "measured FP32 FMA peak (CPU implementations); memory is the peak beyond inputs and outputs.\n\n";

  for (const auto& name : order) {
    const SuiteCases& sc = suites[name];
    json recs = json::array();
    for (const json* r : sc.cases) recs.push_back(*r);
    const json s = summarize(recs);
    const bool pass = s["failed"].get<int>() == 0 && s["checks_failed"].get<int>() == 0;
    md << "## Suite `" << name << "` — " << (pass ? "✅ pass" : "❌ FAIL") << "\n\n";
    md << fmt::format("{} ok, {} failed, {} skipped, {} failed checks.\n\n", s["ok"].get<int>(), s["failed"].get<int>(),
                      s["skipped"].get<int>(), s["checks_failed"].get<int>());
    if (sc.cases.size() < sc.records)
      md << fmt::format("{} records repeat a case of another file; each case is shown once, from the last file.\n\n",
                        sc.records - sc.cases.size());
    context_table(md, by_suite[name]);
    std::vector<std::string> variants;
    std::map<std::string, std::vector<const json*>> by_variant;
    for (const json* r : sc.cases) {
      const auto v = (*r)["variant"].get<std::string>();
      if (!by_variant.count(v)) variants.push_back(v);
      by_variant[v].push_back(r);
    }
    for (const auto& v : variants) variant_table(md, v, by_variant[v]);
    if (a.budget_s > 0) budget_table(md, sc.cases, a.budget_s);
  }
  md << figures_section(a);

  const fs::path out = fs::path(a.out) / "report.md";
  write_text_atomic(out, md.str());
  fmt::print("report: {} suites, {} cases -> {}\n", order.size(), all.size(), out.string());
  return 0;
}

}  // namespace

void add_report(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<ReportArgs>();
  auto* c = app.add_subcommand("report", "Markdown summary of results files with the figures embedded");
  c->add_option("results", args->inputs, "Results JSON files")->required();
  c->add_option("--out", args->out, "Output folder (report.md, figures, figures.json)")->required();
  c->add_flag("--no-plots", args->no_plots, "Tables only; do not run plots/plot.py");
  c->add_option("--budget", args->budget_s,
                "Seconds per step: add a table of how many calls of each variant fit it per N (e.g. suites/trunk.json)")
      ->check(CLI::PositiveNumber);
  c->callback([args, &exit_code] { exit_code = report(*args); });
}

}  // namespace attnbench::cli
