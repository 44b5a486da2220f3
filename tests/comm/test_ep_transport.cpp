// parallel.ep_transport / --ep-transport: the names parse both ways, anything else is bad input
// naming where it came from and the choices.
#include <gtest/gtest.h>

#include <string>

#include "src/comm/ep_transport.h"
#include "tests/support/expect_error.h"

using namespace switchyard;
using namespace switchyard::testing;

TEST(EpTransport, NamesRoundTrip) {
  for (EpTransport transport : {EpTransport::automatic, EpTransport::nccl, EpTransport::nvlink})
    EXPECT_EQ(parse_ep_transport(ep_transport_name(transport), "test"), transport);
  EXPECT_STREQ(ep_transport_name(EpTransport::automatic), "auto");
}

TEST(EpTransport, UnknownNameIsBadInputNamingTheSourceAndChoices) {
  expect_bad_input([] { parse_ep_transport("infiniband", "bench ep: --ep-transport"); },
                   {"bench ep: --ep-transport", "infiniband", "auto, nccl, nvlink"});
  expect_bad_input([] { parse_ep_transport("", "parallel.ep_transport"); }, "parallel.ep_transport");
}
