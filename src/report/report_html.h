// Pieces the report's sections share (src/report/report.cpp, src/report/router_balance.cpp): number
// formatting, summary cards and line charts over steps wrapped in <figure>. Internal to the report.
#pragma once

#include <limits>
#include <string>
#include <vector>

#include "src/report/svg_plot.h"

namespace switchyard {
namespace report_html {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string escape(const std::string& text);
// printf with one double, "-" when it is not finite.
std::string number(double value, const char* format = "%.4g");
std::vector<double> finite(const std::vector<double>& values);  // the finite values, in order
double median_of(std::vector<double> values);                   // of the finite values; NaN if none
bool any_finite(const std::vector<double>& values);
std::string card(const std::string& value, const std::string& label);
std::string figure(const std::string& svg);
PlotSeries series(const std::string& name, const std::vector<double>& x, const std::vector<double>& y,
                  const std::string& color = "");
// A line chart over steps in a <figure>; from_zero: include 0 in the y range; ceiling: the largest
// possible value (NaN: unbounded).
std::string line_chart(const std::string& title, const std::string& y_label, std::vector<PlotSeries> lines,
                       int width = 560, int height = 280, bool from_zero = false, double ceiling = kNaN);

}  // namespace report_html
}  // namespace switchyard
