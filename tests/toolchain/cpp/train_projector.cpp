// A few training steps of a 1x1-conv projector with the contrastive loss, written against the C++ API
// (csrc/include/contrastmask_ops.h) and the library's C++ autograd only: no Python.
// tests/toolchain/test_cmake_build.py runs it and checks the losses and gradients against the Python package.
//
//   train_projector INPUTS OUTPUT   (INPUTS: torch.save'd dict features, masks, cams, is_novel, weight, steps, lr)
#include <torch/torch.h>
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "contrastmask_ops.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: train_projector INPUTS OUTPUT\n";
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto inputs = torch::pickle_load(bytes).toGenericDict();
  const auto get = [&](const char* key) { return inputs.at(key).toTensor(); };
  const at::Tensor features = get("features"), masks = get("masks"), cams = get("cams"), is_novel = get("is_novel");
  const int64_t steps = inputs.at("steps").toInt();
  const double lr = inputs.at("lr").toDouble();

  at::Tensor weight = get("weight").clone().requires_grad_(true);  // (C_out, C_in, 1, 1)
  std::vector<at::Tensor> losses, grads;
  for (int64_t step = 0; step < steps; ++step) {
    const at::Tensor z = at::conv2d(features, weight);
    contrastmask_ops::LossOptions options;
    // Both forms of the seed, which must sample the same keys: an integer, and a 0-dim int64 tensor.
    if (step % 2 == 0) {
      options.seed = step;
    } else {
      options.seed_tensor = at::scalar_tensor(step, at::kLong);
    }
    const at::Tensor loss = contrastmask_ops::query_sharing_contrastive_loss(z, masks, cams, is_novel, options);
    loss.backward();
    losses.push_back(loss.detach().clone());
    grads.push_back(weight.grad().clone());
    {
      torch::NoGradGuard no_grad;
      weight.sub_(weight.grad() * lr);
      weight.mutable_grad().zero_();
    }
  }
  c10::Dict<std::string, at::Tensor> out;
  out.insert("losses", at::stack(losses));
  out.insert("grads", at::stack(grads));
  out.insert("weight", weight.detach());
  const std::vector<char> data = torch::pickle_save(c10::IValue(out));
  std::ofstream(argv[2], std::ios::binary).write(data.data(), static_cast<std::streamsize>(data.size()));
  std::cout << "trained " << steps << " steps, last loss " << losses.back().item<double>() << "\n";
  return 0;
}
