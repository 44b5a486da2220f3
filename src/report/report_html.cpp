// Shared pieces of the report's sections (src/report/report_html.h).
#include "src/report/report_html.h"

#include <algorithm>
#include <cmath>

namespace switchyard {
namespace report_html {

std::string escape(const std::string& text) { return xml_escape(text); }

std::string number(double value, const char* format) {
  return std::isfinite(value) ? format_number(value, format) : "-";
}

std::vector<double> finite(const std::vector<double>& values) {
  std::vector<double> out;
  for (double value : values)
    if (std::isfinite(value)) out.push_back(value);
  return out;
}

double median_of(std::vector<double> values) {
  values = finite(values);
  if (values.empty()) return kNaN;
  std::sort(values.begin(), values.end());
  const size_t middle = values.size() / 2;
  return values.size() % 2 ? values[middle] : 0.5 * (values[middle - 1] + values[middle]);
}

bool any_finite(const std::vector<double>& values) {
  return std::any_of(values.begin(), values.end(), [](double value) { return std::isfinite(value); });
}

std::string card(const std::string& value, const std::string& label) {
  return "<div class=\"card\"><div class=\"value\">" + escape(value) + "</div><div class=\"label\">" + escape(label) +
         "</div></div>";
}

std::string figure(const std::string& svg) { return "<figure>" + svg + "</figure>\n"; }

PlotSeries series(const std::string& name, const std::vector<double>& x, const std::vector<double>& y,
                  const std::string& color) {
  PlotSeries out;
  out.name = name;
  out.x = x;
  out.y = y;
  out.color = color;
  return out;
}

std::string line_chart(const std::string& title, const std::string& y_label, std::vector<PlotSeries> lines,
                       int width, int height, bool from_zero, double ceiling) {
  LineChartOptions options;
  options.y_ceiling = ceiling;
  options.title = title;
  options.x_label = "step";
  options.y_label = y_label;
  options.width = width;
  options.height = height;
  options.y_from_zero = from_zero;
  return figure(svg_line_chart(lines, options));
}

}  // namespace report_html
}  // namespace switchyard
