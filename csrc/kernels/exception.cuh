// Error handling shared by host and device code. No torch headers anywhere in csrc/.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace largeep {

// Thrown by HOST_ASSERT and the CUDA checks; pybind11 turns it into a Python RuntimeError.
class Error : public std::runtime_error {
   public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Builds error messages without iostreams: no locale facets, so a message never depends on which libstdc++ (a
// static copy inside this module, or the process's shared one) serves the stream (a toolchain that linked
// libstdc++ statically made formatting a number crash the process instead of raising).
class Msg {
   public:
    Msg& operator<<(const std::string& v) { return add(v.c_str()); }
    Msg& operator<<(const char* v) { return add(v != nullptr ? v : "(null)"); }
    Msg& operator<<(char v) {
        s_ += v;
        return *this;
    }
    Msg& operator<<(bool v) { return add(v ? "true" : "false"); }
    template <typename T, std::enable_if_t<std::is_integral_v<T> || std::is_enum_v<T>, int> = 0>
    Msg& operator<<(T v) {
        if constexpr (std::is_enum_v<T>) {
            s_ += std::to_string(static_cast<long long>(v));
        } else {
            s_ += std::to_string(v);
        }
        return *this;
    }
    Msg& operator<<(double v) { return fmt("%g", v); }
    Msg& operator<<(const void* v) { return fmt("%p", v); }
    const std::string& str() const { return s_; }

   private:
    Msg& add(const char* v) {
        s_ += v;
        return *this;
    }
    template <typename T>
    Msg& fmt(const char* f, T v) {
        char buf[64];
        std::snprintf(buf, sizeof(buf), f, v);
        return add(buf);
    }
    std::string s_;
};

// " (csrc/dir/file.cu:line)": the source's path from the project's csrc/ on, not the build machine's whole path
inline std::string where(const char* file, int line) {
    std::string f(file);
    const std::size_t at = f.rfind("csrc/");
    if (at != std::string::npos) f.erase(0, at);
    return " (" + f + ":" + std::to_string(line) + ")";
}

}  // namespace largeep

#define HOST_ASSERT(cond, msg)                                                              \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            ::largeep::Msg os_;                                                             \
            os_ << "largeep: " << msg << " [" #cond "]" << ::largeep::where(__FILE__, __LINE__); \
            throw ::largeep::Error(os_.str());                                              \
        }                                                                                   \
    } while (0)

// A failure the caller is told about in words alone (no condition to show): a peer that did not come, and the like.
#define HOST_FAIL(msg)                                                          \
    do {                                                                        \
        ::largeep::Msg os_;                                                     \
        os_ << "largeep: " << msg << ::largeep::where(__FILE__, __LINE__);      \
        throw ::largeep::Error(os_.str());                                      \
    } while (0)

#define CUDA_CHECK(call)                                                                              \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) {                                                                      \
            (void)cudaGetLastError(); /* (cleared: the next launch check must not report it again) */  \
            ::largeep::Msg os_;                                                                       \
            os_ << "largeep: CUDA error " << cudaGetErrorName(e_) << ": " << cudaGetErrorString(e_) \
                << " in " #call << ::largeep::where(__FILE__, __LINE__);                              \
            throw ::largeep::Error(os_.str());                                                        \
        }                                                                                             \
    } while (0)

// Checks the launch that just happened (configuration errors; faults show up at the next sync).
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

#ifdef __CUDACC__
#define DEVICE_ASSERT(cond)                                                          \
    do {                                                                             \
        if (!(cond)) {                                                               \
            printf("largeep device assertion failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            asm volatile("trap;");                                                   \
        }                                                                            \
    } while (0)
#endif
