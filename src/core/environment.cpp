#include "src/core/environment.h"

#include <cstdlib>

namespace switchyard {

const char* environment_value(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' ? value : nullptr;
}

}  // namespace switchyard
