// Every torchgc op takes dense (strided) tensors only. Without a kernel for the sparse dispatch
// keys, a sparse argument would get the dispatcher's generic "Could not run ... with arguments from
// the 'SparseCPU' backend"; this kernel names the op and the argument instead.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torchgc {
namespace {

void reject_non_strided(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const auto inputs = torch::jit::last(*stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (inputs[i].isTensor() && inputs[i].toTensor().layout() != at::kStrided) {
      TORCH_CHECK(false, op.schema().name(), ": expected argument '", arguments[i].name(),
                  "' to be a dense (strided) tensor, got layout ", inputs[i].toTensor().layout());
    }
  }
  TORCH_CHECK(false, op.schema().name(), ": expected dense (strided) tensors only");
}

void register_for(torch::Library& m) {
  for (const char* op : {"offload", "reload", "wait", "rms_norm", "rms_norm_backward", "layer_norm", "layer_norm_backward"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&reject_non_strided>());
  }
}

}  // namespace
}  // namespace torchgc

TORCH_LIBRARY_IMPL(torchgc, SparseCPU, m) { torchgc::register_for(m); }
TORCH_LIBRARY_IMPL(torchgc, SparseCUDA, m) { torchgc::register_for(m); }
TORCH_LIBRARY_IMPL(torchgc, SparseCsrCPU, m) { torchgc::register_for(m); }
TORCH_LIBRARY_IMPL(torchgc, SparseCsrCUDA, m) { torchgc::register_for(m); }
