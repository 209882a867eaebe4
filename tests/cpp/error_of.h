#pragma once
// The message of the exception that fn throws, or "" if it throws none: torch's own c10::Error
// (without its backtrace), or the std::runtime_error torchgc's checks throw.
#include <c10/util/Exception.h>

#include <functional>
#include <string>

inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
