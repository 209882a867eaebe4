#pragma once
// The message of the c10::Error that fn throws, or "" if it throws none.
#include <c10/util/Exception.h>

#include <functional>
#include <string>

inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}
