// Self-registration of binding functions, so each kernel family (csrc/cuda/<family>_bind.cpp)
// adds its own Python entry points without a central list to edit.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace dpfc {

using BindingFn = void (*)(pybind11::module_&);

inline std::vector<BindingFn>& binding_registry() {
  static std::vector<BindingFn> fns;
  return fns;
}

struct BindingRegistrar {
  explicit BindingRegistrar(BindingFn fn) { binding_registry().push_back(fn); }
};

}  // namespace dpfc

#define DPFC_CONCAT_(a, b) a##b
#define DPFC_CONCAT(a, b) DPFC_CONCAT_(a, b)
// At namespace scope in a _bind.cpp: DPFC_REGISTER_BINDINGS(my_register_function);
#define DPFC_REGISTER_BINDINGS(fn) \
  static ::dpfc::BindingRegistrar DPFC_CONCAT(dpfc_registrar_, __LINE__)(fn)
