// Build facts recorded in every results file. Defined in a file generated at
// configure time (cmake/version.cpp.in) so a new commit recompiles one file.
#pragma once

namespace attnbench {

const char* version();
const char* git_sha();
const char* compiler_flags();

}  // namespace attnbench
