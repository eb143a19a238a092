#include "harness/pass.hpp"

#include "harness/errors.hpp"

namespace attnbench {

std::string_view pass_name(Pass p) {
  switch (p) {
    case Pass::fwd:
      return "fwd";
    case Pass::bwd:
      return "bwd";
    case Pass::fwd_bwd:
      return "fwd_bwd";
  }
  return "?";
}

Pass parse_pass(const std::string& s, const std::string& where) {
  for (Pass p : {Pass::fwd, Pass::bwd, Pass::fwd_bwd})
    if (s == pass_name(p)) return p;
  throw InputError(where + ": unknown pass '" + s + "', expected fwd, bwd or fwd_bwd" +
                   did_you_mean(s, {"fwd", "bwd", "fwd_bwd"}));
}

}  // namespace attnbench
